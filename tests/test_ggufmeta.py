"""The runtime reads GGUF headers with llama.cpp's own reader (ctypes); gguf-py, which wrote the files,
must read the same fields, and the keys the runtime looks up must be gguf-py's."""

from __future__ import annotations

import gguf
import pytest

from llavacli import ggufmeta
from llavacli.backend import CONFORMANCE_DIR, DATA
from llavacli.errors import ModelError
from llavacli.ggufmeta import read_gguf

DEMO = DATA / "demo"
SHIPPED = [DEMO / "demo.gguf", DEMO / "demo.mmproj.gguf", CONFORMANCE_DIR / "tiny.gguf", CONFORMANCE_DIR / "tiny.mmproj.gguf"]


def gguf_py_fields(path) -> dict:
    """What gguf-py reads: scalars, strings and numeric arrays (string arrays left out, as read_gguf does)."""
    fields = {}
    for name, field in gguf.GGUFReader(path, "r").fields.items():
        if name.startswith("GGUF."):  # gguf-py's own entries for the header counts, not keys in the file
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            strings = field.types[1] == gguf.GGUFValueType.STRING
            fields[name] = None if strings else [field.parts[i].tolist()[0] for i in field.data]
        elif kind == gguf.GGUFValueType.STRING:
            fields[name] = bytes(field.parts[field.data[0]]).decode()
        else:
            fields[name] = field.parts[field.data[0]].tolist()[0]
    return fields


def test_the_keys_are_gguf_pys():
    assert ggufmeta.ARCHITECTURE_KEY == gguf.Keys.General.ARCHITECTURE
    assert ggufmeta.CLIP_HAS_LLAVA_PROJECTOR_KEY == gguf.Keys.Clip.HAS_LLAVA_PROJECTOR
    assert ggufmeta.CLIP_BLOCK_COUNT_KEY == gguf.Keys.ClipVision.BLOCK_COUNT
    assert ggufmeta.CLIP_IMAGE_SIZE_KEY == gguf.Keys.ClipVision.IMAGE_SIZE
    assert ggufmeta.CLIP_PROJECTION_DIM_KEY == gguf.Keys.ClipVision.PROJECTION_DIM
    assert ggufmeta.EMBEDDING_LENGTH_KEY == gguf.Keys.LLM.EMBEDDING_LENGTH


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_read_gguf_reads_what_gguf_py_reads(path):
    info = read_gguf(path)
    expected = gguf_py_fields(path)
    assert info.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert info.fields[key] == pytest.approx(value) if isinstance(value, float) else info.fields[key] == value, key
    assert info.architecture == expected["general.architecture"]
    assert ggufmeta.text_embedding_length(info) or ggufmeta.mmproj_output_length(info)


def test_a_damaged_header_is_named_with_llama_cpps_reason(tmp_path, capfd):
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + (2**31 + 7).to_bytes(4, "little") + bytes(64))  # a version no reader knows
    with pytest.raises(ModelError, match=r"^model .*damaged.gguf: damaged GGUF file \(gguf_init_from_reader: [^)]+\)$"):
        read_gguf(damaged)
    assert capfd.readouterr().err == "", "llama.cpp's log reached stderr"


def test_a_truncated_file_is_named_with_its_sizes(tmp_path):
    data = (DEMO / "demo.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 10])
    with pytest.raises(ModelError, match=rf"^mmproj .*cut.gguf: truncated GGUF file \({len(data) - 10} of {len(data)} bytes\)$"):
        read_gguf(cut, "mmproj")
