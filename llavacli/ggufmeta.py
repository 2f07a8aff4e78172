"""GGUF metadata both sides agree on: the keys gguf-py lacks, and reading a file's header without llama.cpp.

Reading the header first lets the runtime refuse a damaged or mismatched pair with a clear message before
llama.cpp sees it (llama.cpp answers a truncated file with an abort or a bare NULL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import Keys

from llavacli.errors import ModelError

# Keys of our own, in a namespace of our own: what the converter knew about the checkpoint.
TEMPLATE_KEY = "llavacli.template"  # text model: the conversation template it was trained with
IMAGE_MODE_KEY = "llavacli.image_mode"  # mmproj: images.PAD or images.CROP
# clip.cpp reads this (KEY_FEATURE_LAYERS in tools/mtmd/clip-impl.h); gguf-py has no constant for it.
FEATURE_LAYER_KEY = "clip.vision.feature_layer"


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    fields: dict

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


def _value(field: gguf.ReaderField):
    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.STRING:
            return None  # token lists: large, and nothing here needs them
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def read_gguf(path: Path, role: str = "model") -> GGUFInfo:
    """The header of a GGUF file, or a ModelError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{role} {path}: no such file")
    if path.is_dir():
        raise ModelError(f"{role} {path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{role} {path}: not a GGUF file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, IndexError or struct errors on damage
        raise ModelError(f"{role} {path}: damaged GGUF file ({e})") from None
    expected = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if path.stat().st_size < expected:
        raise ModelError(f"{role} {path}: truncated GGUF file ({path.stat().st_size} of {expected} bytes)")
    fields = {name: _value(f) for name, f in reader.fields.items()}
    return GGUFInfo(path, fields.get(Keys.General.ARCHITECTURE, ""), fields)


def text_embedding_length(info: GGUFInfo) -> int:
    return int(info.get(f"{info.architecture}.embedding_length", 0))


def mmproj_output_length(info: GGUFInfo) -> int:
    return int(info.get(Keys.ClipVision.PROJECTION_DIM, 0))
