"""`llava convert` as a user runs it: outputs, quantization, and refusals that leave nothing behind."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest

from conftest import run_llava
from llavacli.ggufmeta import FEATURE_LAYER_KEY, IMAGE_MODE_KEY, TEMPLATE_KEY


def _one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llava: error:"), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def _fields(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("tokenizer.ggml.")}


def test_convert_writes_the_pair_with_llava_metadata(checkpoints):
    text, mmproj = checkpoints.gguf("hf15", "f32")
    t, m = _fields(text), _fields(mmproj)
    assert t["general.architecture"] == "llama" and t[TEMPLATE_KEY] == "vicuna_v1"
    assert t["llama.attention.head_count_kv"] == 2  # grouped-query attention carried over
    assert m["general.architecture"] == "clip" and m["clip.projector_type"] == "mlp"
    assert m[FEATURE_LAYER_KEY] == [2]  # hidden state -2 of a 3-layer tower
    assert m["clip.vision.block_count"] == 3  # every layer stored, the feature layer decides what runs
    assert m[IMAGE_MODE_KEY] == "pad" and m["clip.use_gelu"] is False
    assert m["clip.vision.projection_dim"] == t["llama.embedding_length"]
    names = {tensor.name for tensor in gguf.GGUFReader(mmproj).tensors}
    assert {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "mm.0.weight", "mm.2.weight"} <= names
    assert "v.post_ln.weight" not in names


def test_llava_v1_checkpoint_crops_and_uses_its_own_layer(checkpoints):
    _, mmproj = checkpoints.gguf("orig1", "f32")
    m = _fields(mmproj)
    assert m[IMAGE_MODE_KEY] == "crop" and m["clip.vision.image_size"] == 224


@pytest.mark.parametrize("outtype, file_type", [("f16", 1), ("q8_0", 7), ("q4_k_m", 15)])
def test_outtypes_quantize_the_text_model(checkpoints, outtype, file_type):
    text, mmproj = checkpoints.gguf("hf15", outtype)
    assert _fields(text)["general.file_type"] == file_type
    types = {t.tensor_type.name for t in gguf.GGUFReader(text).tensors}
    if outtype == "f16":
        assert "F16" in types
    elif outtype == "q8_0":
        assert "Q8_0" in types
    else:  # the tiny model's rows are not multiples of 256: llama.cpp falls back to other small types
        assert types - {"F32", "F16"}, types
    assert {t.tensor_type.name for t in gguf.GGUFReader(mmproj).tensors} <= {"F32", "F16"}
    assert not list(text.parent.glob(".*partial*"))


def test_original_layout_from_bin_shards_and_safetensors(checkpoints):
    for kind in ("orig15", "orig1"):
        text, mmproj = checkpoints.gguf(kind, "f32")
        assert text.is_file() and mmproj.is_file()


def test_existing_outputs_are_kept_without_force(checkpoints, tmp_path):
    src, _ = checkpoints.source("hf15")
    out = tmp_path / "out"
    out.mkdir()
    (out / "hf15.gguf").write_text("my precious file")
    _one_line_error(run_llava("convert", src, out), 1, "hf15.gguf", "--force")
    assert (out / "hf15.gguf").read_text() == "my precious file"
    assert sorted(p.name for p in out.iterdir()) == ["hf15.gguf"]
    assert run_llava("convert", src, out, "--force").returncode == 0
    assert (out / "hf15.gguf").read_bytes()[:4] == b"GGUF"


def test_a_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    _one_line_error(run_llava("convert", tmp_path / "src", tmp_path / "out"), 1, "config.json")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _one_line_error(run_llava("convert", tmp_path / "src", tmp_path / "out"), 1, "bert", "not LLaVA")
    _one_line_error(run_llava("convert", tmp_path / "nowhere", tmp_path / "out"), 1, "nowhere")
    assert not (tmp_path / "out").exists()


def test_a_truncated_safetensors_file(checkpoints, tmp_path):
    src, _ = checkpoints.source("hf15")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    _one_line_error(run_llava("convert", broken, tmp_path / "out"), 1, "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_a_missing_vision_tower(checkpoints, tmp_path):
    src, _ = checkpoints.source("orig15")
    moved = tmp_path / "orig"
    shutil.copytree(src, moved)
    config = json.loads((moved / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "no-tower")
    (moved / "config.json").write_text(json.dumps(config))
    _one_line_error(run_llava("convert", moved, tmp_path / "out"), 1, "vision tower", "--vision-tower")
    _one_line_error(run_llava("convert", moved, tmp_path / "out", "--vision-tower", tmp_path), 1, "--vision-tower")
    assert not (tmp_path / "out").exists()
    tower = checkpoints.source("orig15")[1]
    assert run_llava("convert", moved, tmp_path / "out", "--vision-tower", tower).returncode == 0


def test_a_model_with_a_size_of_zero_is_refused(checkpoints, tmp_path):
    """It would convert, and llama.cpp would then abort the process loading it."""
    src, _ = checkpoints.source("hf15")
    copy = tmp_path / "no-ff"
    shutil.copytree(src, copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 0
    (copy / "config.json").write_text(json.dumps(config))
    _one_line_error(run_llava("convert", copy, tmp_path / "out"), 1, "text_config.intermediate_size is 0")
    assert not (tmp_path / "out").exists()


def test_unknown_outtype_is_a_usage_error(checkpoints, tmp_path):
    src, _ = checkpoints.source("hf15")
    _one_line_error(run_llava("convert", src, tmp_path / "out", "--outtype", "q3"), 2, "--outtype")


def test_convert_fetches_a_hub_repo_id(checkpoints, tmp_path):
    """A repo id goes through huggingface_hub's real client, against a local stand-in for the Hub."""
    from localhub import LocalHub

    src, _ = checkpoints.source("hf15")
    commit = "c" * 40
    with LocalHub() as hub:
        files = [p for p in src.iterdir() if p.is_file()]
        for path in files:
            hub.add_file("tiny-org/tiny-llava-hf", path.name, path.read_bytes(), commit=commit)
        listing = {"id": "tiny-org/tiny-llava-hf", "sha": commit, "siblings": [{"rfilename": p.name} for p in files]}
        tree = [{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40} for p in files]
        for rev in ("main", commit):
            hub.pages[f"/api/models/tiny-org/tiny-llava-hf/revision/{rev}"] = (200, json.dumps(listing).encode())
            hub.pages[f"/api/models/tiny-org/tiny-llava-hf/tree/{rev}"] = (200, json.dumps(tree).encode())
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        proc = run_llava("convert", "tiny-org/tiny-llava-hf", tmp_path / "out", env=env)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out" / "tiny-llava-hf.gguf").is_file()
        missing = run_llava("convert", "tiny-org/no-such-repo", tmp_path / "out2", env=env)
    _one_line_error(missing, 1, "tiny-org/no-such-repo")
    assert not (tmp_path / "out2").exists()
