"""The shipped demo model, through the installed `llava eval`, answers held-out questions well above chance.

The held-out pictures and questions are made again here by the generator (seeded test split, never trained
on); `llava eval` answers the first PER_KIND of each kind through the runtime of `llava ask`.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_llava
from llavacli.models import DEMO_DIR
from train.miniature import data as D

# The targets are 0.95 / 0.95 / 0.80 for colour, shape and count. The shipped model measures 0.94 /
# 0.95 / 0.87, and 0.94 on yes/no and 0.60 on multiple choice, on the recipe's first 100 questions per kind
# (README, "The demo model"); these floors hold it there, ten points under, so a model that answers at chance
# (about 0.2 for colour and shape, 0.65 for yes/no by always saying no, 0.25-0.35 for the letters) or a
# broken runtime fails.
FLOORS = {D.KIND_COLOR: 0.84, D.KIND_SHAPE: 0.85, D.KIND_COUNT: 0.77, D.KIND_YESNO: 0.84, D.KIND_CHOICE: 0.50}
PER_KIND = 60

pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / "demo.gguf").is_file() or not (DEMO_DIR / "demo.mmproj.gguf").is_file(),
    reason="the demo model is not in llavacli/data/demo (python -m train.miniature --out DIR --install)",
)


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heldout")
    questions = D.write_heldout(folder, n_images=300, per_kind=250, seed=0)
    proc = run_llava("eval", "demo", questions, "--limit", PER_KIND, "--json", "--out", folder / "predictions.jsonl", timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_demo_answers_held_out_questions_well_above_chance(summary):
    accuracy = {k: v["accuracy"] for k, v in summary["kinds"].items()}
    for kind, floor in FLOORS.items():
        assert summary["kinds"][kind]["n"] == PER_KIND
        assert accuracy[kind] >= floor, (kind, accuracy)
        assert accuracy[kind] >= summary["chance"][kind]["majority"] + 0.2, (kind, accuracy, summary["chance"][kind])

