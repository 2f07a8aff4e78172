"""The shipped demo model, through the installed `llava` command, answers held-out questions at its targets.

The held-out pictures and questions are made again here by the generator (seeded test split, never trained
on). To keep the test to a few `llava ask` calls, it takes the prompts that recur most among the questions,
each asked over all its pictures at once (`--images-from`), until every kind has enough questions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from llavacli import evaluate
from llavacli.models import DEMO_DIR
from train.miniature import data as D

TARGETS = {D.KIND_COLOR: 0.95, D.KIND_SHAPE: 0.95, D.KIND_COUNT: 0.80}
PER_KIND = 40

pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / "demo.gguf").is_file() or not (DEMO_DIR / "demo.mmproj.gguf").is_file(),
    reason="the demo model is not in llavacli/data/demo (python -m train.miniature --out DIR --install)",
)


def _llava() -> list[str]:
    exe = shutil.which("llava", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "llavacli.cli"]


def _sample(records: list[dict]) -> list[dict]:
    """Whole prompt groups, largest first, until each kind has PER_KIND questions."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["text"]].append(r)
    taken: dict[str, int] = defaultdict(int)
    sample = []
    for text, group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        kind = group[0]["kind"]
        if taken[kind] < PER_KIND:
            sample += group
            taken[kind] += len(group)
    return sample


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    questions = D.write_heldout(folder, n_images=300, per_kind=250, seed=0)
    records = _sample([json.loads(line) for line in open(questions)])
    by_text: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_text[r["text"]].append(r)
    answers: dict[str, str] = {}
    for text, group in by_text.items():
        listing = folder / "list.txt"
        listing.write_text("".join(str(folder / r["image"]) + "\n" for r in group))
        run = subprocess.run(
            [*_llava(), "ask", "--model", "demo", "--images-from", str(listing), "--json", "--max-tokens", "12", text],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
        assert len(lines) == len(group), run.stdout[-2000:]
        for r, line in zip(group, lines):
            assert Path(line["image"]).name == Path(r["image"]).name
            answers[r["question_id"]] = line["answer"]
    return records, [answers[r["question_id"]] for r in records]


def test_demo_meets_its_targets_on_held_out_questions(predictions):
    records, preds = predictions
    summary = evaluate.summarize(records, preds)
    accuracy = {k: v["accuracy"] for k, v in summary["kinds"].items()}
    for kind, target in TARGETS.items():
        assert summary["kinds"][kind]["n"] >= PER_KIND
        assert accuracy[kind] >= target, (kind, accuracy)


def test_demo_beats_chance_on_yes_no_and_multiple_choice(predictions):
    records, preds = predictions
    summary = evaluate.summarize(records, preds)
    chance = evaluate.chance(records)
    for kind in (D.KIND_YESNO, D.KIND_CHOICE):
        assert summary["kinds"][kind]["accuracy"] >= chance[kind]["majority"] + 0.25, (kind, summary["kinds"][kind], chance[kind])
