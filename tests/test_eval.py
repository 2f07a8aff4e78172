"""`llava eval` driven as a user drives it: the installed command, a real GGUF pair, real images, a JSONL."""

from __future__ import annotations

import json

import pytest

from conftest import run_llava
from llavacli import evaluate

QUESTIONS = ["What shape is in the picture?", "Is there a circle?"]


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints.gguf("hf15", "f32")


@pytest.fixture(scope="module")
def asked(pair, images):
    """What `llava ask` answers to each (image, question): the reference every eval prediction must equal."""
    out = {}
    for q in QUESTIONS:
        proc = run_llava("ask", *images.values(), q, "-m", pair[0], "-n", "8", "--json", "--no-cache")
        assert proc.returncode == 0, proc.stderr
        for line in proc.stdout.splitlines():
            row = json.loads(line)
            out[(row["image"], q)] = row["answer"]
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_eval_predicts_as_ask_does_and_scores_by_each_kinds_rule(pair, images, asked, tmp_path):
    (tmp_path / "pics").mkdir()
    records = []
    for i, (name, image) in enumerate(images.items()):
        (tmp_path / "pics" / image.name).write_bytes(image.read_bytes())
        said = asked[(str(image), QUESTIONS[0])]
        # right for the first picture only, whatever the random model says
        records.append({"question_id": f"s{i}", "image": f"pics/{image.name}", "text": QUESTIONS[0], "kind": "shape", "answer": said if i == 0 else said + " nope"})
        records.append({"question_id": f"y{i}", "image": f"pics/{image.name}", "text": QUESTIONS[1], "kind": "yes/no", "answer": "yes" if i % 2 else "no"})
    questions = tmp_path / "questions.jsonl"
    _write(questions, records)
    out = tmp_path / "preds.jsonl"

    proc = run_llava("eval", pair[0], questions, "--out", out, "-n", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in records]
    for row, record, image in zip(rows, records, [im for im in images.values() for _ in QUESTIONS]):
        assert row["prediction"] == asked[(str(image), record["text"])]
    assert summary["kinds"]["shape"] == {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3), "interval": pytest.approx([0.0615, 0.7923], abs=1e-4)}
    # POPE figures follow from the predictions by LLaVA's reading of yes/no
    yn = [(r["answer"], evaluate.parse_yes_no(row["prediction"])) for r, row in zip(records, rows) if r["kind"] == "yes/no"]
    assert summary["yes/no"] == evaluate.pope_metrics([a for a, _ in yn], [p for _, p in yn])
    assert summary["kinds"]["yes/no"]["correct"] == sum(a == p for a, p in yn)
    assert [r["correct"] for r in rows if r["kind"] == "shape"] == [True, False, False]


def test_eval_prints_a_table_and_keeps_the_first_n_of_each_kind(pair, images, asked, tmp_path):
    image = images["square"]
    said = asked[(str(image), QUESTIONS[0])]
    records = [{"image": str(image), "text": QUESTIONS[0], "kind": k, "answer": said} for k in ("a", "a", "a", "b", "b")]
    questions = tmp_path / "q.jsonl"
    _write(questions, records)
    proc = run_llava("eval", pair[0], questions, "--limit", "2", "-n", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert table["a"][:3] == ["2", "100.0%", "34.2-100.0%"] and table["b"][:3] == ["2", "100.0%", "34.2-100.0%"]
    assert table["all"] == ["4", "100.0%", "51.0-100.0%"]
    written = tmp_path / f"q.{pair[0].stem}.predictions.jsonl"
    assert len(written.read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"text": "hi", "answer": "x"}\nnot json\n', "q.jsonl:2: not a JSON object"),
        ('{"text": "hi"}\n', 'q.jsonl:1: a question needs at least "text" and "answer"'),
        ('{"text": "hi", "answer": "x", "image": "gone.png"}\n', "q.jsonl:1: image"),
        ('{"text": "hi", "answer": "x", "rule": "fuzzy"}\n', "unknown scoring rule 'fuzzy'"),
        ("\n", "no questions in it"),
    ],
)
def test_eval_refuses_a_bad_questions_file_in_one_line(pair, tmp_path, content, expected):
    questions = tmp_path / "q.jsonl"
    questions.write_text(content)
    proc = run_llava("eval", pair[0], questions, cwd=tmp_path)
    assert proc.returncode == 1
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_eval_never_overwrites_predictions_without_force(pair, images, tmp_path):
    questions = tmp_path / "q.jsonl"
    _write(questions, [{"image": str(images["square"]), "text": QUESTIONS[0], "answer": "x"}])
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    proc = run_llava("eval", pair[0], questions, "--out", out)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert out.read_text() == "precious\n"
    proc = run_llava("eval", pair[0], questions, "--out", out, "--force", "-n", "4")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["question_id"] == "line-1"
    assert not any(p.name.startswith(".mine.jsonl.partial") for p in tmp_path.iterdir())
