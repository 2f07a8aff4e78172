"""ScienceQA in LLaVA's training format, with the paper's prompt (LLaVA scripts/convert_sqa_to_llava.py).

The dataset's own format (github.com/lupantech/ScienceQA, data/scienceqa/): problems.json maps a problem id to
{"question", "choices", "answer" (an index), "hint", "image" (a file name or null), "lecture", "solution", ...};
pid_splits.json maps a split name ("train", "val", "test", ...) to problem ids; images live in
images/<split>/<pid>/<image>.

The prompt is named by its parts: the input (Q question, C context, M multiple-choice options) and the output
(L lecture, E explanation, i.e. the solution, A answer). The paper fine-tunes on QCM-LEA:

    human: <question>\\nContext: <hint or N/A>\\nOptions: (A) ... (B) ...\\n<image>
    gpt:   <lecture> <solution> The answer is <letter>.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.data import DataError

OPTIONS = "ABCDE"
INPUTS = {
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choices}\n",
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choices}\n",
}
OUTPUTS = {
    "A": "Answer: The answer is {answer}.",
    "LA": "Answer: {lecture} The answer is {answer}.",
    "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}.",
}


def prompt(problem: dict, prompt_format: str = "QCM-LEA") -> tuple[str, str]:
    """(question, answer) for one problem, character for character as LLaVA's converter writes them."""
    input_format, _, output_format = prompt_format.partition("-")
    if input_format not in INPUTS or output_format not in OUTPUTS:
        raise DataError(
            f"prompt format {prompt_format!r}: choose an input of {', '.join(INPUTS)} and an output of {', '.join(OUTPUTS)}, as QCM-LEA"
        )
    fields = {
        "question": problem["question"],
        "context": problem.get("hint", "").strip() or "N/A",
        "choices": " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"])),
        "answer": OPTIONS[problem["answer"]],
        # LLaVA escapes newlines and unescapes them again, which turns any literal "\n" into a newline.
        "lecture": problem.get("lecture", "").replace("\\n", "\n"),
        "solution": problem.get("solution", "").replace("\\n", "\n"),
    }
    question = INPUTS[input_format].format(**fields).replace("  ", " ").strip()
    answer = OUTPUTS[output_format].format(**fields).replace("  ", " ").strip()
    if question.startswith("Question: "):
        question = question.replace("Question: ", "")
    if answer.startswith("Answer: "):
        answer = answer.replace("Answer: ", "")
    return question, answer


def to_llava(problems: dict, pids: list[str], prompt_format: str = "QCM-LEA") -> list[dict]:
    records = []
    for pid in pids:
        problem = problems[pid]
        question, answer = prompt(problem, prompt_format)
        record = {"id": pid}
        if problem.get("image"):
            record["image"] = f"{pid}/{problem['image']}"
            question = f"{question}\n<image>"
        record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append(record)
    return records


def convert(source: str | Path, out: str | Path, split: str = "train", prompt_format: str = "QCM-LEA") -> int:
    """problems.json + pid_splits.json in `source` -> a LLaVA JSON at `out`; returns the number of samples."""
    source = Path(source)
    try:
        problems = json.loads((source / "problems.json").read_text())
        splits = json.loads((source / "pid_splits.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{source}: needs ScienceQA's problems.json and pid_splits.json ({e})") from None
    if split not in splits:
        raise DataError(f"split {split!r} is not in pid_splits.json (it has {', '.join(splits)})")
    records = to_llava(problems, splits[split], prompt_format)
    Path(out).write_text(json.dumps(records, indent=2) + "\n")
    return len(records)
