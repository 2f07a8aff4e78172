"""The miniature answering held-out questions in transformers: the reference the llama.cpp numbers are held to.

The prompt is built as the runtime builds it (llavacli.prompts' vicuna_v1, the image first in the first turn)
and tokenised as train/ tokenises it (BOS once, the text split at the image and each piece tokenised alone, one
`<image>` token per patch); pictures go through llavacli.images.preprocess with LLaVA-1.5's padding. Decoding
is greedy, as LLaVA's evaluation, several questions at a time (left-padded: the answers are the same as one
at a time, up to float rounding). Scoring is llavacli.evaluate's, the same that `llava eval` uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llavacli import evaluate
from llavacli.eval import read_questions
from llavacli.images import preprocess
from llavacli.prompts import IMAGE, Turn, get_template


class Answerer:
    def __init__(self, model_dir: Path, template: str = "vicuna_v1"):
        from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        proc = CLIPImageProcessor.from_pretrained(model_dir)
        self.mean = np.asarray(proc.image_mean, dtype=np.float32)
        self.std = np.asarray(proc.image_std, dtype=np.float32)
        cfg = self.model.config
        self.size = cfg.vision_config.image_size
        self.n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        self.image_id = cfg.image_token_id
        self.template = get_template(template)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(preprocess(img, self.size, "pad"), dtype=np.float32) / 255.0
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]

    def prompt_ids(self, question: str) -> list[int]:
        text = self.template.render([Turn(question, 1)])
        before, after = text.split(IMAGE)
        ids = [self.tok.bos_token_id]
        ids += self.tok(before, add_special_tokens=False).input_ids
        ids += [self.image_id] * self.n_image
        ids += self.tok(after, add_special_tokens=False).input_ids
        return ids

    def answer(self, img: Image.Image, question: str, max_new_tokens: int = 24) -> str:
        return self.answer_batch([img], [question], max_new_tokens)[0]

    @torch.no_grad()
    def answer_batch(self, imgs: list[Image.Image], questions: list[str], max_new_tokens: int = 24) -> list[str]:
        """Greedy answers to several (image, question) pairs at once: prompts left-padded, masked."""
        prompts = [self.prompt_ids(q) for q in questions]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=torch.cat([self.pixels(img) for img in imgs]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
        )
        return [self.tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def run_eval(
    model_dir: Path, questions: Path, out: Path | None = None, limit: int | None = None, log=None, batch: int = 25, max_new_tokens: int = 12
) -> dict:
    """Answer every question (or the first `limit` of each kind), score, and write predictions + summary."""
    records = read_questions(questions, limit)  # the same records `llava eval` answers
    answerer = Answerer(model_dir)
    predictions: list[str] = []

    def load(r: dict) -> Image.Image:
        with Image.open(r["image"]) as img:
            return img.convert("RGB")

    for b in range(0, len(records), batch):
        part = records[b : b + batch]
        predictions += answerer.answer_batch([load(r) for r in part], [r["text"] for r in part], max_new_tokens)
        if log and (b // batch + 1) % 10 == 0:
            log(f"transformers eval: {len(predictions)}/{len(records)}")
    summary = evaluate.summarize(records, predictions)
    summary["chance"] = evaluate.chance(records)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".jsonl"), "w") as f:
            for r, p in zip(records, predictions):
                s = evaluate.score(r, p)
                f.write(json.dumps({"question_id": r["question_id"], "kind": r["kind"], "prediction": p, "answer": r["answer"], "correct": s.correct}) + "\n")
        out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(summary: dict, other: dict | None = None, names: tuple[str, str] = ("transformers", "llama.cpp")) -> str:
    """A Markdown table: per kind accuracy, next to chance (and next to another run's, when given)."""
    head = f"| kind | n | {names[0]} |" + (f" {names[1]} |" if other else "") + " chance (majority / uniform) |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for kind, acc in summary["kinds"].items():
        ch = summary["chance"][kind]
        cells = [kind, str(acc["n"]), f"{100 * acc['accuracy']:.1f}%"]
        if other:
            cells.append(f"{100 * other['kinds'][kind]['accuracy']:.1f}%" if kind in other["kinds"] else "-")
        cells.append(f"{100 * ch['majority']:.1f}% / {100 * ch['uniform']:.1f}%")
        rows.append("| " + " | ".join(cells) + " |")
    yn = summary.get("yes/no")
    if yn:
        rows.append("")
        rows.append(
            f"yes/no (POPE): accuracy {100 * yn['accuracy']:.1f}%, precision {100 * yn['precision']:.1f}%, "
            f"recall {100 * yn['recall']:.1f}%, F1 {100 * yn['f1']:.1f}%, yes-ratio {100 * yn['yes_ratio']:.1f}%"
        )
    return "\n".join(rows)


def run_eval_llamacpp(
    text_gguf: Path, mmproj_gguf: Path, questions: Path, out: Path, limit: int | None = None, threads: int = 2
) -> dict:
    """The same questions through llama.cpp, by the code behind `llava eval` (llavacli.eval): the runtime of
    `llava ask`, scored the same way. Predictions go to out.jsonl, the summary to out."""
    from llavacli.engine import Engine
    from llavacli.eval import run_eval as run_eval_in_llamacpp

    records = read_questions(questions, limit)
    with Engine(text_gguf, mmproj_gguf, n_ctx=1024, n_threads=threads, n_gpu_layers=0) as engine:
        summary = run_eval_in_llamacpp(engine, get_template(engine.template_name), records, out.with_suffix(".jsonl"), max_tokens=12)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
