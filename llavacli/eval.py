"""`llava eval`: a questions file answered through the runtime of `llava ask`, scored by llavacli.evaluate.

Each question starts a fresh conversation (system prompt, image, question), decoded greedily as LLaVA's
evaluation does; the image cache serves repeated pictures. Every prediction goes to a JSONL as it is made,
the per-kind summary to stdout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from llavacli import evaluate
from llavacli.ask import answer_one
from llavacli.cache import Cache
from llavacli.engine import Engine, Sampling
from llavacli.errors import InputError
from llavacli.images import load_image
from llavacli.prompts import Template


def read_questions(path: Path, limit: int | None = None) -> list[dict]:
    """The question records (see llavacli.evaluate), checked before any model loads; `limit` keeps the first
    `limit` of each kind. Image paths are made absolute, relative to the file's folder."""
    if not path.is_file():
        raise InputError(f"{path}: no such questions file")
    records: list[dict] = []
    per_kind: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "answer" not in record:
                raise InputError(f"{path}:{number}: a question needs at least \"text\" and \"answer\"")
            try:
                rule = evaluate.rule_for(record)  # an unknown "rule" is refused here, before any model loads
            except ValueError as e:
                raise InputError(f"{path}:{number}: {e}") from None
            kind = str(record.get("kind") or rule)
            if limit and per_kind.get(kind, 0) >= limit:
                continue
            per_kind[kind] = per_kind.get(kind, 0) + 1
            record.setdefault("question_id", f"line-{number}")
            if record.get("image"):
                image = Path(record["image"]).expanduser()
                record["image"] = os.path.normpath(image if image.is_absolute() else path.parent / image)
                if not Path(record["image"]).is_file():
                    raise InputError(f"{path}:{number}: image {record['image']} not found")
            records.append(record)
    if not records:
        raise InputError(f"{path}: no questions in it")
    return records


def default_output(questions: Path, model_name: str) -> Path:
    return Path(f"{questions.stem}.{Path(model_name).stem}.predictions.jsonl")


def run_eval(
    engine: Engine,
    template: Template,
    records: list[dict],
    out: Path,
    *,
    max_tokens: int = 16,
    system: str | None = None,
    cache: Cache | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> dict:
    """Answer and score every record; predictions are written to `out` (via a temporary file, renamed at the
    end, so an interrupted run leaves no half file under the final name). Returns evaluate.summarize's
    summary with the chance levels added."""
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    predictions: list[str] = []
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for record in records:
                image = load_image(record["image"]) if record.get("image") else None
                answer = answer_one(engine, template, record["text"], image, sampling, system, cache=cache)
                scored = evaluate.score(record, answer.answer)
                predictions.append(answer.answer)
                f.write(json.dumps(_prediction_row(record, answer.answer, scored), ensure_ascii=False) + "\n")
                f.flush()
                progress(1)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    summary = evaluate.summarize(records, predictions)
    summary["chance"] = evaluate.chance(records)
    return summary


def _prediction_row(record: dict, prediction: str, scored: evaluate.Scored) -> dict:
    return {
        "question_id": record["question_id"],
        "kind": scored.kind,
        "image": record.get("image"),
        "prompt": record["text"],
        "prediction": prediction,
        "parsed": scored.parsed,
        "answer": record["answer"],
        "correct": scored.correct,
    }


def _interval(acc: dict) -> str:
    low, high = acc["interval"]
    return f"{100 * low:.1f}-{100 * high:.1f}%"


def summary_table(summary: dict) -> str:
    """Per-kind accuracy with its 95% interval, next to chance, as plain text for a terminal; the POPE
    figures below."""
    rows = [("kind", "n", "accuracy", "95% interval", "chance")]
    for kind in summary["kinds"]:
        acc = summary["kinds"][kind]
        ch = summary["chance"][kind]
        rows.append((kind, str(acc["n"]), f"{100 * acc['accuracy']:.1f}%", _interval(acc), f"{100 * max(ch['majority'], ch['uniform']):.1f}%"))
    overall = summary["overall"]
    rows.append(("all", str(overall["n"]), f"{100 * overall['accuracy']:.1f}%", _interval(overall), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    yn = summary.get("yes/no")
    if yn:
        lines.append(
            f"yes/no (POPE): accuracy {100 * yn['accuracy']:.1f}%  precision {100 * yn['precision']:.1f}%  "
            f"recall {100 * yn['recall']:.1f}%  F1 {100 * yn['f1']:.1f}%  yes-ratio {100 * yn['yes_ratio']:.1f}%"
        )
    return "\n".join(lines)
