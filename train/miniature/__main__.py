"""`python -m train.miniature --out DIR [--quick] [--seed N] [--install] [--no-eval] [--facts-first]`: the demo model from scratch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    parser.add_argument("--facts-first", action="store_true",
                        help="start the language model on the facts alone: it then learns its lookup under every seed tried (README)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for stages 1 and 2 (default 2)")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from train.miniature.recipe import FULL, QUICK, build

    recipe = QUICK if args.quick else FULL
    if args.threads:
        recipe = replace(recipe, threads=args.threads)
    if args.facts_first:
        recipe = replace(recipe, lm_facts_first=True)
    build(args.out, recipe, seed=args.seed, install=args.install, evaluate=args.evaluate, start_at=args.start_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
