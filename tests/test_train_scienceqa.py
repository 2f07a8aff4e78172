"""ScienceQA's own format -> LLaVA JSON with the paper's QCM-LEA prompt, on a small hand-made sample."""

from __future__ import annotations

import json

from llavacli.prompts import get_template
from train import data
from train.cli import main
from train.scienceqa import prompt

PROBLEMS = {
    "7": {
        "question": "Which of these states is farthest north?",
        "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "lecture": "Maps have four cardinal directions, or main directions.\\nNorth, south, east, and west.",
        "solution": "To find the answer, look at the compass rose. West Virginia is farthest north.",
        "split": "train",
    },
    "12": {
        "question": "Which tense does the sentence use?\nMona will print her name.",
        "choices": ["future tense", "present tense", "past tense"],
        "answer": 0,
        "hint": "Read the sentence.",
        "image": None,
        "lecture": "",
        "solution": "The verb ends in will.  So it is future tense.",
        "split": "train",
    },
    "99": {"question": "Q?", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None, "lecture": "", "solution": "", "split": "test"},
}
SPLITS = {"train": ["7", "12"], "test": ["99"]}


def test_qcm_lea_prompt_is_question_context_options_then_lecture_solution_answer():
    question, answer = prompt(PROBLEMS["7"])
    assert question == (
        "Which of these states is farthest north?\nContext: N/A\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma"
    )
    assert answer == (
        "Maps have four cardinal directions, or main directions.\nNorth, south, east, and west. "
        "To find the answer, look at the compass rose. West Virginia is farthest north. The answer is A."
    )
    question, answer = prompt(PROBLEMS["12"])
    assert question == "Which tense does the sentence use?\nMona will print her name.\nContext: Read the sentence.\nOptions: (A) future tense (B) present tense (C) past tense"
    # No lecture: LLaVA's converter collapses the double space (once, as str.replace does) and strips.
    assert answer == "The verb ends in will. So it is future tense. The answer is A."
    assert prompt(PROBLEMS["99"], "QCM-A") == ("Q?\nContext: N/A\nOptions: (A) a (B) b", "The answer is B.")


def test_converter_writes_llava_json_that_trains(tmp_path, capsys):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    out = tmp_path / "llava_train_QCM-LEA.json"
    assert main(["scienceqa", str(tmp_path), str(out)]) == 0
    assert "2 samples" in capsys.readouterr().err
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == ["7", "12"]
    assert records[0]["image"] == "7/image.png" and "image" not in records[1]
    assert records[0]["conversations"][0]["value"].endswith("(D) Oklahoma\n<image>")
    assert records[0]["conversations"][1] == {"from": "gpt", "value": prompt(PROBLEMS["7"])[1]}
    # The image moves to the front of the question when the data is read, as in LLaVA's preprocess_multimodal.
    turns, image = data.to_turns(records[0], get_template("vicuna_v1"))
    assert image == "7/image.png" and turns[0].user.startswith("Which of these states") and turns[0].images == 1
    assert main(["scienceqa", str(tmp_path), str(out), "--split", "dev"]) == 1
    assert "split 'dev' is not in pid_splits.json (it has train, test)" in capsys.readouterr().err
