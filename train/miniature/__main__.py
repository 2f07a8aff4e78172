"""`python -m train.miniature --out DIR [--quick] [--seed N] [--install] [--no-eval] [--lm-phases SPEC] [--lm-late-places FROM:SHARE] [--lm-heads N] [--lm-ff N] [--stage1-facts SHARE]`: the demo model from scratch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.miniature.recipe import LM_PHASES, Recipe


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share between 0 and 1")
    return value


def phases_spec(text: str) -> tuple[tuple[str, float], ...]:
    """"places:0.25,facts:0.225" -> (("places", 0.25), ("facts", 0.225)); "none" -> ()."""
    if text.strip() == "none":
        return ()
    phases = []
    for part in text.split(","):
        name, _, text_value = part.strip().partition(":")
        try:
            value = float(text_value)
        except ValueError:
            value = 0.0
        if name not in LM_PHASES or not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: expected NAME:SHARE, NAME one of {', '.join(LM_PHASES)} and SHARE between 0 and 1")
        phases.append((name, value))
    if sum(v for _, v in phases) >= 1:
        raise argparse.ArgumentTypeError("the first phases must leave steps for the whole text")
    return tuple(phases)


def late_spec(text: str) -> tuple[float, float] | tuple[()]:
    """"0.6:0.125" -> (0.6, 0.125); "none" -> ()."""
    if text.strip() == "none":
        return ()
    start, _, rows = text.partition(":")
    try:
        pair = (float(start), float(rows))
    except ValueError:
        pair = (-1.0, -1.0)
    if not (0 <= pair[0] < 1 and 0 < pair[1] < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FROM:SHARE, FROM at least 0 and below 1, SHARE between 0 and 1")
    return pair


def feed_forward_width(text: str) -> int:
    """1 to 4096: llama.cpp cannot run a language model without feed-forward layers (convert refuses 0)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 1 to 4096")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.miniature",
        description="Train the miniature LLaVA (the `demo` preset) from scratch: data, vision tower, language model, "
        "stage 1, stage 2, evaluation, conversion. Seeded; about 20-30 minutes on two CPU cores (--quick: a few minutes).",
    )
    parser.add_argument("--out", required=True, type=Path, help="working directory (data, checkpoints, GGUF pair, recipe.json)")
    parser.add_argument("--quick", action="store_true", help="a shortened run (small data, few steps) that exercises every stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true", help="copy the GGUF pair into llavacli/data/demo/ (the shipped preset)")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the held-out evaluation in transformers")
    parser.add_argument("--start-at", default="data", choices=("data", "pretrain", "stage1", "stage2", "eval", "convert"),
                        help="(development) skip the phases before this one, reusing what --out holds")
    parser.add_argument("--lm-phases", type=phases_spec, default=None, metavar="SPEC",
                        help="the language model's first phases, in order, as NAME:SHARE_OF_STEPS,... (default "
                        + ",".join(f"{name}:{part}" for name, part in Recipe.lm_phases) + "; 'none' for none); NAME is one of: "
                        + "; ".join(f"{k}, {v}" for k, v in LM_PHASES.items()))
    parser.add_argument("--stage1-facts", type=share, default=None, metavar="SHARE",
                        help="share of the stage-1 pairs that state the scene's facts instead of a brief caption (default 0)")
    parser.add_argument("--lm-late-places", type=late_spec, default=None, metavar="FROM:SHARE",
                        help="from this share of the language model's steps on, this share of every batch is by-place "
                        "questions (data.place_question_document) (default "
                        + (":".join(map(str, Recipe.lm_late_places)) if Recipe.lm_late_places else "none") + "; 'none' for none)")
    parser.add_argument("--lm-heads", type=int, choices=(1, 2, 3, 4, 6, 8), default=None, metavar="N",
                        help=f"the language model's attention heads, dividing its width of 192 (default {Recipe.lm_heads})")
    parser.add_argument("--lm-ff", type=feed_forward_width, default=None, metavar="N",
                        help=f"the width of the language model's feed-forward layers, 1 to 4096 (default {Recipe.lm_ff})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for stages 1 and 2 (default 2)")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from train.miniature.recipe import FULL, QUICK, build

    recipe = QUICK if args.quick else FULL
    if args.threads:
        recipe = replace(recipe, threads=args.threads)
    if args.stage1_facts is not None:
        recipe = replace(recipe, sizes=replace(recipe.sizes, stage1_facts=args.stage1_facts))
    if args.lm_late_places is not None:
        recipe = replace(recipe, lm_late_places=args.lm_late_places or None)
    if args.lm_heads is not None:
        recipe = replace(recipe, lm_heads=args.lm_heads)
    if args.lm_ff is not None:
        recipe = replace(recipe, lm_ff=args.lm_ff)
    if args.lm_phases is not None:
        recipe = replace(recipe, lm_phases=args.lm_phases)
    from llavacli.errors import LlavaError

    try:
        build(args.out, recipe, seed=args.seed, install=args.install, evaluate=args.evaluate, start_at=args.start_at)
    except LlavaError as e:  # e.g. --start-at past phases that --out holds nothing of
        print(f"python -m train.miniature: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
