"""The llama.cpp backend: its LLaVA conformance verdict, and third-party mmproj files that run correctly."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
from PIL import Image

import reference
from conftest import run_llava
from llavacli import backend
from llavacli.engine import Engine
from llavacli.ggufmeta import FEATURE_LAYER_KEY

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes-1.png"


def _rewrite(src, dst, *, drop_keys=(), drop_tensors=lambda name: False, set_keys=None):
    """A copy of a GGUF with keys removed or changed and tensors left out, made with gguf-py."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    kept = [t for t in reader.tensors if not drop_tensors(t.name)]
    reader.tensors = kept
    copy_with_new_metadata(reader, writer, dict(set_keys or {}), list(drop_keys))
    return dst


def test_installed_backend_is_conformant():
    verdict = backend.conformance(use_cache=False)
    assert verdict.conformant, verdict.describe()
    assert verdict.mean_cos > 0.99999 and verdict.min_cos > 0.9999


def test_conformance_check_catches_a_backend_running_the_wrong_layers(tmp_path):
    """The check is not a rubber stamp: features from the wrong ViT depth fail it."""
    broken = _rewrite(
        backend.CONFORMANCE_DIR / "tiny.mmproj.gguf",
        tmp_path / "broken.mmproj.gguf",
        set_keys={FEATURE_LAYER_KEY: MetadataDetails(gguf.GGUFValueType.ARRAY, [1], sub_type=gguf.GGUFValueType.INT32)},
    )
    verdict = backend.measure_conformance(mmproj=broken)
    assert not verdict.conformant
    assert verdict.mean_cos < 0.99


def test_verdict_is_cached_per_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path))
    first = backend.conformance()
    assert (tmp_path / "conformance.json").is_file()
    assert backend.conformance() == first
    assert first.fingerprint == backend.build_fingerprint()


@pytest.mark.parametrize(
    "child, said",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "died of SIGSEGV"),
        ("import sys; sys.exit('cannot open tiny.gguf')", "failed (exit status 1: cannot open tiny.gguf)"),
    ],
)
def test_a_self_check_that_crashes_is_a_verdict_not_a_crash(tmp_path, monkeypatch, child, said):
    """The check runs in a child process: a backend that dies on it cannot take the user's command with it."""
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path))
    monkeypatch.setattr(backend, "SELF_CHECK", [sys.executable, "-c", child])
    verdict = backend.conformance(use_cache=False)
    assert not verdict.conformant
    assert said in verdict.describe() and verdict.describe().startswith("unchecked:")
    assert backend.conformance() == verdict  # remembered for this build, like any verdict


def test_a_command_after_a_crashed_self_check_warns_and_still_answers(tmp_path):
    crashed = backend._unchecked("the LLaVA self-check of this llama.cpp build died of SIGSEGV")
    (tmp_path / "conformance.json").write_text(json.dumps(dataclasses.asdict(crashed)))
    proc = run_llava("ask", "--model", "demo", EXAMPLE, "What shape is in the picture?", env={"LLAVA_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "warning: the LLaVA self-check of this llama.cpp build died of SIGSEGV" in proc.stderr
    assert "llava info --check" in proc.stderr


def test_info_reports_backend_and_verdict():
    proc = run_llava("info")
    assert proc.returncode == 0, proc.stderr
    assert "llama-cpp-python   0.3.36+llava.clsfix" in proc.stdout
    assert "LLaVA conformance  conformant" in proc.stdout
    assert "CPU" in proc.stdout


def test_legacy_mmproj_runs_as_llava_computes(checkpoints, images, tmp_path):
    """A file in the layout of llama.cpp's legacy converter: last ViT layer not stored, no feature layer.

    Stock llama.cpp runs one layer too few on it; the engine hands llama.cpp a copy with the feature
    layer set, so the features still match transformers.
    """
    text, mmproj = checkpoints.gguf("hf15", "f32")
    n_layers = int(gguf.GGUFReader(mmproj).fields["clip.vision.block_count"].contents())
    last = f"v.blk.{n_layers - 1}."
    legacy = _rewrite(
        mmproj,
        tmp_path / "legacy.mmproj.gguf",
        drop_keys=[FEATURE_LAYER_KEY, "clip.vision.block_count"],
        drop_tensors=lambda name: name.startswith(last),
        set_keys={"clip.vision.block_count": MetadataDetails(gguf.GGUFValueType.UINT32, n_layers - 1)},
    )
    assert FEATURE_LAYER_KEY not in gguf.GGUFReader(legacy).fields
    img = Image.open(images["wide"])
    want = reference.load_llava_hf(checkpoints.source("hf15")[0]).image_features(img)
    with Engine(text, legacy, n_ctx=1024) as engine:
        got = engine.image_embeddings(img)
    cos = reference.cosines(got, want)
    assert cos.mean() >= 0.99999 and cos.min() >= 0.9999
    assert FEATURE_LAYER_KEY not in gguf.GGUFReader(legacy).fields


def test_weights_repacked_on_several_threads_compute_what_plain_weights_compute(tmp_path, capfd):
    """backend/repack-threads.patch repacks each large weight in slices of rows, one per thread, when the
    engine loads the LLM alone; beside the vision model it keeps upstream's one thread. A slice put in the
    wrong place scrambles the weight's rows, and the logits part from those of the file loaded plain."""
    import tinymodels

    shape = dataclasses.replace(tinymodels.V15, text_hidden=1024, text_ff=2048, text_heads=8, text_kv_heads=4)
    src = tinymodels.make_llava_hf(tmp_path / "wide", shape)
    proc = run_llava("convert", src, tmp_path / "gguf", "--outtype", "q4_k_m")
    assert proc.returncode == 0, proc.stderr
    text, mmproj = tmp_path / "gguf" / "wide.gguf", tmp_path / "gguf" / "wide.mmproj.gguf"
    capfd.readouterr()
    logits, slices = {}, {}
    for how, repack, beside in (("alone", True, False), ("beside the vision model", True, True), ("plain", False, False)):
        with Engine(text, mmproj, n_ctx=256, n_threads=2, n_gpu_layers=0, repack=repack, verbose=True,
                    vision_first=lambda engine: beside) as engine:
            engine.feed("A picture of a red square and a blue circle")
            logits[how] = engine.logits()
        slices[how] = capfd.readouterr().err.count("repack tensor blk.0.ffn_up.weight")
    if slices["alone"] == 0:
        pytest.skip("llama.cpp repacks no Q4_K weight on this CPU")
    assert os.environ.get("GGML_REPACK_THREADS") is None, "the engine left its setting behind"
    # The 2048-row weight (1.2 MB) in whole groups of 64 rows: 2 slices of 1024 on 2 threads.
    assert (slices["alone"], slices["beside the vision model"], slices["plain"]) == (2, 1, 0)
    # Repacked and plain kernels sum Q4_K blocks in another order: cosine 0.99987 on this model, with the
    # single-threaded repacking too. One weight's two halves of rows swapped, loaded plain: 0.04.
    for how in ("alone", "beside the vision model"):
        assert reference.cosines(logits[how][None], logits["plain"][None])[0] > 0.999, how
        assert np.argmax(logits[how]) == np.argmax(logits["plain"]), how
    assert np.array_equal(logits["alone"], logits["beside the vision model"]), "slices repack to other bytes than one pass"
