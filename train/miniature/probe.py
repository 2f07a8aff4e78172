"""A text-only probe of the lookup the demo's language model has to learn: find a shape by one property, say
another ("What color is the star?" finds by kind, "What shape is the red object?" by colour).

    python -m train.miniature.probe --ask colour --steps 600

A fresh LLaMA of the miniature's shape reads each scene as its patch words, composed as in pre-training
(language.ComposedEmbedding), followed either by facts about the scene (data.facts) or by one short question
answered. Every --every steps it answers held-out colour, shape and yes/no questions ("Is there a red
star?"), and colour and shape questions that name the shape by its place ("What color is the shape in the
top left corner?"); the first answer token is scored, split by how many shapes the scene holds, and the
by-place ones by whether the place is a corner, an edge or the centre. One scene per row and no picture:
a few minutes for what a full recipe run (about 21) shows of the language model's lookups.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from llavacli.prompts import Turn, get_template
from train.miniature import data as D
from train.miniature import language as L

ASKS = {"colour": (D.qa_color,), "shape": (D.qa_shape,), "exists": (D.qa_exists,), "both": (D.qa_color, D.qa_shape),
        "all": (D.qa_color, D.qa_shape, D.qa_exists),
        "place": (partial(D.qa_color, by_place=True), partial(D.qa_shape, by_place=True))}
HELD_OUT = (("colour", D.qa_color), ("shape", D.qa_shape), ("yes/no", D.qa_exists),
            ("colour by place", partial(D.qa_color, by_place=True)), ("shape by place", partial(D.qa_shape, by_place=True)))
TOKENIZER_DOCUMENTS = 2000  # enough for every patch word to be one piece


@dataclass(frozen=True)
class Probe:
    ask: str = "both"  # which questions the rows ask (ASKS)
    facts: float = 0.5  # share of the rows that are facts instead of a question
    steps: int = 600
    batch: int = 64
    seq: int = 64
    lr: float = 2e-3
    every: int = 150
    held_out: int = 150  # questions per kind
    place_steps: int = 0  # a first phase on place lists alone (data.place_list); then 1 row in 10 is one
    shape: L.LMShape = L.LMShape()
    seed: int = 0


def make_tokenizer(directory: Path | None, seed: int):
    """The tokenizer of a recipe's language model (directory), or one trained here on generated text."""
    if directory is not None:
        return L.hf_tokenizer(directory)
    rng = random.Random(f"probe/{seed}/tokenizer")
    documents = [D.lm_document(D.make_scene(rng, "t"), rng) for _ in range(TOKENIZER_DOCUMENTS)]
    with tempfile.TemporaryDirectory(prefix="probe-tokenizer-") as scratch:  # the tokenizer is kept in memory
        L.train_tokenizer(Path(scratch), documents, L.LMShape().vocab, seed)
        return L.hf_tokenizer(Path(scratch))


class Rows:
    """Token rows of one scene each: the patch words, then facts or a question; targets on what follows them."""

    def __init__(self, tok, seq: int):
        self.tok, self.seq, self.template = tok, seq, get_template("vicuna_v1")

    def question(self, scene: D.Scene, rng: random.Random, maker) -> tuple[list[int], list[int]]:
        qa = maker(scene, rng)
        prompt = self.template.render([Turn(D.grid_text(scene) + "\n" + D.short_prompt(qa), 0)])
        prompt = prompt[len(self.template.opening()) :]  # no system prompt: the same every time
        return self.split(prompt, " " + qa.short)

    def facts(self, scene: D.Scene, rng: random.Random) -> tuple[list[int], list[int]]:
        return self.split(D.grid_text(scene) + "\n", D.facts(scene, rng))

    def split(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        ids = self.tok(prompt + answer).input_ids + [self.tok.eos_token_id]
        head = self.tok(prompt).input_ids
        if ids[: len(head)] != head:
            raise RuntimeError(f"the answer changes how the prompt tokenizes: {prompt[-40:]!r} + {answer[:20]!r}")
        return head, ids[len(head) :]

    def batch(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(pairs), self.seq), self.tok.pad_token_id)
        labels = torch.full((len(pairs), self.seq), -100)
        for i, (prompt, answer) in enumerate(pairs):
            row = (prompt + answer)[: self.seq]
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
        return ids, labels


def run(probe: Probe, tok, log=print) -> list[dict]:
    """Train, scoring the held-out questions every probe.every steps; one report per scoring."""
    torch.manual_seed(probe.seed)
    model = LlamaForCausalLM(L.lm_config(probe.shape, tok))
    composed = L.composed_embedding(model, tok)
    rows = Rows(tok, probe.seq)
    rng, held_rng = random.Random(f"probe/{probe.seed}/train"), random.Random(f"probe/{probe.seed}/held-out")
    held = []  # (kind, shapes in the scene, prompt ids, first answer token, region of the place it names or None)
    for kind, maker in HELD_OUT:
        for _ in range(probe.held_out):
            scene = D.make_scene(held_rng, "h")
            prompt, answer = rows.question(scene, held_rng, maker)
            held.append((kind, len(scene.shapes), prompt, answer[0], region_named(tok.decode(prompt))))

    @torch.no_grad()
    def score() -> dict:
        model.eval()
        hits = defaultdict(list)
        for start in range(0, len(held), 50):
            chunk = held[start : start + 50]
            ids = torch.full((len(chunk), max(len(p) for _, _, p, _, _ in chunk)), tok.pad_token_id)
            for i, (_, _, prompt, _, _) in enumerate(chunk):
                ids[i, : len(prompt)] = torch.tensor(prompt)
            logits = model(inputs_embeds=composed(ids)).logits
            for i, (kind, n, prompt, first, region) in enumerate(chunk):
                right = int(logits[i, len(prompt) - 1].argmax()) == first
                hits[kind].append(right)
                hits[f"{kind}/{n}"].append(right)
                if region and kind.endswith("by place"):
                    hits[f"{kind}@{region}"].append(right)
        model.train()
        return {k: sum(v) / len(v) for k, v in sorted(hits.items())}

    makers, reports, start = ASKS[probe.ask], [], time.time()

    def places(scene: D.Scene) -> tuple[list[int], list[int]]:
        return rows.split(D.grid_text(scene) + "\n", D.place_list(scene, rng))

    def row() -> tuple[list[int], list[int]]:
        scene = D.make_scene(rng, "t")
        if probe.place_steps and rng.random() < 0.1:
            return places(scene)
        as_facts = rng.random() < probe.facts
        return rows.facts(scene, rng) if as_facts else rows.question(scene, rng, rng.choice(makers))

    def phase(steps: int, make_row, scored: bool) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=probe.lr, betas=(0.9, 0.98), weight_decay=0.0)
        losses = []
        for step in range(steps):
            ids, labels = rows.batch([make_row() for _ in range(probe.batch)])
            for group in opt.param_groups:
                group["lr"] = L.cosine_lr(step, steps, probe.lr, 0.03)
            loss = model(inputs_embeds=composed(ids), labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if scored and ((step + 1) % probe.every == 0 or step + 1 == steps):
                recent = losses[-probe.every :]
                report = {"step": step + 1, "loss": sum(recent) / len(recent), "seconds": round(time.time() - start), **score()}
                reports.append(report)
                log(describe(report))

    model.train()
    if probe.place_steps:
        phase(probe.place_steps, lambda: places(D.make_scene(rng, "t")), scored=False)
    phase(probe.steps, row, scored=True)
    return reports


REGIONS = ("corner", "edge", "centre")


def region_named(question: str) -> str | None:
    """Which kind of cell a question names by its place ("in the top left corner": corner), if it does."""
    for cell, where in D.WHERE.items():
        if where in question:
            return REGIONS[(cell[0] == 1) + (cell[1] == 1)]
    return None


def describe(report: dict) -> str:
    kinds = []
    for kind, _ in HELD_OUT:
        split = " ".join(f"{k.rsplit('/', 1)[1]}:{v:.0%}" for k, v in report.items() if k.startswith(kind + "/"))
        regions = " ".join(f"{r}:{report[f'{kind}@{r}']:.0%}" for r in REGIONS if f"{kind}@{r}" in report)
        kinds.append(f"{kind} {report[kind]:.0%} (by shapes {split})" + (f" (by place {regions})" if regions else ""))
    return f"step {report['step']} loss {report['loss']:.3f} | " + " | ".join(kinds) + f" | {report['seconds']}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.miniature.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ask", choices=sorted(ASKS), default="both", help="which questions the training rows ask")
    parser.add_argument("--facts", type=float, default=0.5, help="share of the rows that are facts (data.facts)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=150, help="score the held-out questions every this many steps")
    parser.add_argument("--held-out", type=int, default=150, help="held-out questions per kind")
    parser.add_argument("--layers", type=int, default=L.LMShape.layers)
    parser.add_argument("--heads", type=int, default=L.LMShape.heads)
    parser.add_argument("--hidden", type=int, default=L.LMShape.hidden)
    parser.add_argument("--ff", type=int, default=L.LMShape.ff, help="feed-forward width")
    parser.add_argument("--place-steps", type=int, default=0, help="first train this many steps on place lists alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, help="a recipe's language model directory (DIR/lm) to take the tokenizer from")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the recipe: one seed, one result (recipe.build)
    shape = L.LMShape(hidden=args.hidden, ff=args.ff, layers=args.layers, heads=args.heads, kv_heads=args.heads)
    probe = Probe(ask=args.ask, facts=args.facts, steps=args.steps, batch=args.batch, lr=args.lr, every=args.every,
                  held_out=args.held_out, shape=shape, seed=args.seed, place_steps=args.place_steps)
    run(probe, make_tokenizer(args.tokenizer, args.seed), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
