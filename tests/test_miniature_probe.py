"""The lookup probe (`python -m train.miniature.probe`): its rows supervise exactly the answers, and a short run
trains and scores both kinds of question."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train.miniature import data as D
from train.miniature import probe as P

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    return P.Rows(P.make_tokenizer(None, seed=0), seq=P.Probe.seq)


def test_a_question_row_supervises_its_answer_and_the_end_of_turn(rows):
    rng = random.Random(1)
    for k in range(20):
        scene = D.make_scene(rng, "t")
        maker = (D.qa_color, D.qa_shape)[k % 2]
        prompt, answer = rows.question(scene, random.Random(k), maker)
        qa = maker(scene, random.Random(k))
        text = rows.tok.decode(prompt, skip_special_tokens=True)
        assert text == f"USER: {D.grid_text(scene)}\n{D.short_prompt(qa)} ASSISTANT:", text
        assert answer[-1] == rows.tok.eos_token_id
        assert rows.tok.decode(answer[:-1]).strip() == qa.short


def test_a_facts_row_supervises_the_facts_and_not_the_patch_words(rows):
    scene = D.make_scene(random.Random(2), "t", n=3)
    prompt, answer = rows.facts(scene, random.Random(3))
    assert rows.tok.decode(prompt, skip_special_tokens=True).strip() == D.grid_text(scene)
    assert rows.tok.decode(answer[:-1]).strip() == D.facts(scene, random.Random(3))
    ids, labels = rows.batch([(prompt, answer)])
    kept = labels[0][labels[0] != -100].tolist()
    assert kept == (prompt + answer)[len(prompt) : P.Probe.seq]


def test_a_short_run_trains_and_scores_both_kinds():
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature.probe", "--steps", "40", "--every", "20", "--batch", "16", "--held-out", "25"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    reports = re.findall(r"^step (\d+) loss ([\d.]+) \| colour (\d+)% \(by shapes ([^)]*)\) \| shape (\d+)%.*"
                         r"\| yes/no (\d+)% \(by shapes ([^)]*)\)", run.stdout, re.M)
    assert [int(r[0]) for r in reports] == [20, 40], run.stdout
    assert float(reports[1][1]) < float(reports[0][1]) * 0.8, reports
    for split in (reports[1][3], reports[1][6]):  # colour's and yes/no's, the latter a kind with "/" in its name
        assert [part.split(":")[0] for part in split.split()] == ["1", "2", "3", "4", "5"], split
    by_place = re.findall(r"\| (colour|shape) by place \d+% \(by shapes 1:\d+%[^)]*\) \(by place corner:\d+%", run.stdout)
    assert by_place == ["colour", "shape"] * 2, run.stdout


def test_a_place_question_is_split_by_the_kind_of_cell_it_names():
    assert P.region_named("What color is the shape in the top left corner?") == "corner"
    assert P.region_named("Which shape is at the bottom?") == "edge"
    assert P.region_named("What is the shape on the right?") == "edge"
    assert P.region_named("Which color does the shape in the center have?") == "centre"
    assert P.region_named("What color is the star?") is None
    assert sorted(P.region_named(w) for w in D.WHERE.values()) == ["centre"] + ["corner"] * 4 + ["edge"] * 4


def test_a_place_phase_runs_first_and_only_the_main_steps_are_scored():
    run = subprocess.run(
        [sys.executable, "-m", "train.miniature.probe", "--place-steps", "10", "--steps", "20", "--every", "10",
         "--batch", "8", "--held-out", "10"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.findall(r"^step (\d+) ", run.stdout, re.M) == ["10", "20"], run.stdout
