"""The miniature's whole recipe, shortened (`python -m train.miniature --quick`): every stage runs, through
train/ and `llava convert`, and every stage's loss falls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = ("vision", "language", "stage1", "stage2")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("miniature")
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature", "--out", str(out), "--quick"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_loss_falls(quick_run, stage):
    phase = json.loads((quick_run / "recipe.json").read_text())["phases"][stage]
    assert phase["steps"] >= 10
    assert phase["loss_end"] < phase["loss_start"], phase


@pytest.mark.slow
def test_the_same_seed_makes_the_same_files(quick_run, tmp_path):
    """Byte for byte: without torch's deterministic kernels two runs on two threads drift apart in the
    language model's training, and at full size learn different lookups (docs/demo-model.md)."""
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature", "--out", str(tmp_path), "--quick", "--no-eval", "--threads", "2"],
        capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("demo.gguf", "demo.mmproj.gguf"):
        assert (tmp_path / "gguf" / name).read_bytes() == (quick_run / "gguf" / name).read_bytes(), name


@pytest.mark.slow
def test_the_language_models_first_phase_is_the_easy_scenes(quick_run):
    from train.miniature import data as D
    from train.miniature.recipe import QUICK

    phases = json.loads((quick_run / "recipe.json").read_text())["phases"]["language"]["first_phases"]
    easy = int(QUICK.sizes.lm_documents * QUICK.sizes.lm_easy)
    assert phases == [{"draws_on": "easy", "documents": easy, "steps": int(0.3 * QUICK.lm_steps)}]
    docs = D.read_lm_documents(quick_run / "data" / "lm.txt")
    shapes = [sum(w in D.PATCH_WORDS for w in d.split()) for d in docs]  # a document shows one grid at most
    assert max(shapes[:easy]) <= 2 < max(shapes[easy:])


@pytest.mark.slow
def test_lm_phases_and_heads_reach_the_language_model(tmp_path):
    """`--lm-phases places:0.25,facts:0.2` reaches the trainer: all the by-place questions, then every facts
    document; `--lm-late-places 0.5:0.25` mixes them into the second half's batches, 2 rows of 8; `--lm-heads 4`
    and `--lm-ff 96` give the saved language model four heads and feed-forward layers 96 wide."""
    from train.miniature import data as D
    from train.miniature.recipe import QUICK

    run = subprocess.run(
        [sys.executable, "-m", "train.miniature", "--out", str(tmp_path), "--quick", "--lm-phases", "places:0.25,facts:0.2", "--lm-late-places", "0.5:0.25", "--lm-heads", "4", "--lm-ff", "96", "--no-eval", "--threads", "1"],
        capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    phase = json.loads((tmp_path / "recipe.json").read_text())["phases"]["language"]
    docs = D.read_lm_documents(tmp_path / "data" / "lm.txt")
    held = max(20, len(docs) // 50)
    facts = sum(D.is_facts_document(d) for d in docs[:-held])
    assert phase["first_phases"] == [
        {"draws_on": "places", "documents": QUICK.sizes.lm_place_questions, "steps": int(0.25 * QUICK.lm_steps)},
        {"draws_on": "facts", "documents": facts, "steps": int(0.2 * QUICK.lm_steps)},
    ] and 0 < facts < len(docs) - held
    assert phase["late_places"] == {"documents": QUICK.sizes.lm_place_questions, "from_step": QUICK.lm_steps // 2, "rows_per_batch": 2}
    assert phase["loss_end"] < phase["loss_start"]
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"], config["intermediate_size"]) == (4, 4, 192, 96)


def test_lm_phases_that_make_no_sense_are_refused_in_one_line():
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature", "--out", "unused", "--lm-phases", "facts:0.7,places:0.4"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 2 and "leave steps for the whole text" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("option", [["--lm-late-places", "0.6"], ["--lm-late-places", "1:0.1"], ["--lm-heads", "5"], ["--lm-ff", "0"]])
def test_language_model_options_out_of_range_are_refused_in_one_line(option):
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature", "--out", "unused", *option],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 2 and option[0] in run.stderr and "Traceback" not in run.stderr and not (Path(__file__).resolve().parents[1] / "unused").exists()


def test_starting_past_phases_that_left_nothing_is_one_line(tmp_path):
    """`--start-at convert` on a folder with no stage-2 checkpoint: a one-line error, exit 1, nothing written."""
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature", "--out", str(tmp_path / "run"), "--start-at", "convert", "--no-eval"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "llava-hf: no such directory" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "gguf").exists()


@pytest.mark.slow
def test_stage1_trains_the_projector_and_stage2_starts_from_it(quick_run):
    assert (quick_run / "stage1" / "projector.safetensors").is_file()
    stage2 = (quick_run / "configs" / "stage2.toml").read_text()
    assert f'projector = "{quick_run / "stage1"}"' in stage2
    assert 'template = "vicuna_v1"' in stage2
    assert 'template = "plain"' in (quick_run / "configs" / "stage1.toml").read_text()


@pytest.mark.slow
def test_quick_run_converts_to_a_small_gguf_pair(quick_run):
    text, mmproj = quick_run / "gguf" / "demo.gguf", quick_run / "gguf" / "demo.mmproj.gguf"
    assert text.is_file() and mmproj.is_file()
    assert text.stat().st_size + mmproj.stat().st_size <= 25 * 2**20
    from gguf import GGUFReader

    arch = GGUFReader(mmproj).fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "clip"


@pytest.mark.slow
def test_quick_run_was_evaluated_in_transformers(quick_run):
    summary = json.loads((quick_run / "eval-transformers.json").read_text())
    assert set(summary["kinds"]) == {"colour", "shape", "count", "yes/no", "multiple choice"}
    lines = (quick_run / "eval-transformers.jsonl").read_text().splitlines()
    assert len(lines) == sum(k["n"] for k in summary["kinds"].values())


@pytest.mark.slow
def test_readout_labels_every_held_out_patch_with_its_cell(quick_run):
    from train.miniature import data as D
    from train.miniature.readout import CELLS, features

    tower, projected, cells, occupied = features(quick_run, limit=5)
    scenes = D.load_scenes(quick_run / "data", "test")[:5]
    assert len(tower) == len(projected) == len(cells) == 5 * CELLS
    config = json.loads((quick_run / "llava-hf" / "config.json").read_text())
    assert tower.shape[1] == config["vision_config"]["hidden_size"]
    assert projected.shape[1] == config["text_config"]["hidden_size"]  # what the language model reads
    assert cells.tolist() == list(range(CELLS)) * 5
    assert occupied.tolist() == [owner >= 0 for s in scenes for owner in D.patch_owners(s)]
