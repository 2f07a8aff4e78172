"""llama.cpp's repacked weights (its default on a CPU) against the plain layout, part by part, in one process.

    .venv/bin/python bench/repack.py [--runs 5]     # needs bench/compare.py's pair: --build-only makes it

Per run, for each layout in turn (alternated): loading the LLM; evaluating one image's 576 tokens after the
system prompt (its embeddings computed once beforehand, so the vision encoder is not in it); decoding 64
tokens of one answer; a decoding step of 8 answers side by side, as `llava ask` with 8 images takes it.
Prints the medians and each as a ratio, plain to repacked. Never run by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from llavacli.ask import split_at_image  # noqa: E402
from llavacli.engine import Engine  # noqa: E402
from llavacli.prompts import IMAGE, get_template  # noqa: E402

PAIR = ROOT / "bench" / "out" / "pairs" / "llava15-1b"
IMAGE_FILE = ROOT / "bench" / "out" / "run" / "image0.png"
TOKENS = 64
SIDE_BY_SIDE = 8


def measure(repack: bool, threads: int, embd) -> dict[str, float]:
    start = time.perf_counter()
    engine = Engine(PAIR / "llava15-1b.gguf", PAIR / "llava15-1b.mmproj.gguf", n_ctx=4096, n_threads=threads,
                    n_gpu_layers=0, flash_attn=True, repack=repack)
    seconds = {"load (s)": time.perf_counter() - start}
    with engine:
        before, after = split_at_image(get_template("vicuna_v1"), "What is in the picture?", None)
        engine.start_with(before)
        engine.image_token_count()  # the vision model loaded, which the image's chunk needs
        start = time.perf_counter()
        engine.feed(IMAGE, [Image.open(IMAGE_FILE).convert("RGB")], [embd])
        seconds["576 image tokens (s)"] = time.perf_counter() - start
        engine.feed(after)
        state, n_past = bytes(engine.save_state()), engine.n_past
        token = engine.llama.token_bos()  # any token: the cost of a step does not depend on it
        start = time.perf_counter()
        for i in range(TOKENS):
            engine.llama.eval([token])
        seconds["decode, 1 answer (ms/step)"] = (time.perf_counter() - start) / TOKENS * 1000

        engine.use_sequences(SIDE_BY_SIDE, 1024)
        for seq in range(SIDE_BY_SIDE):
            engine.seq_restore(seq, state)
        start = time.perf_counter()
        for i in range(TOKENS):
            engine.seq_decode([(seq, n_past + i, [token]) for seq in range(SIDE_BY_SIDE)])
        seconds[f"decode, {SIDE_BY_SIDE} answers (ms/step)"] = (time.perf_counter() - start) / TOKENS * 1000
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if not PAIR.exists():
        sys.exit(f"no bench pair at {PAIR}: run .venv/bin/python bench/compare.py --build-only first")

    with Engine(PAIR / "llava15-1b.gguf", PAIR / "llava15-1b.mmproj.gguf", n_gpu_layers=0, n_threads=args.threads) as engine:
        embd = engine.image_embeddings(Image.open(IMAGE_FILE).convert("RGB"))
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for run in range(args.runs):
        for repack in (True, False):
            results[repack].append(measure(repack, args.threads, embd))
        print(f"run {run + 1} of {args.runs}: " + ", ".join(f"{k} {v:.3f}/{results[False][-1][k]:.3f}"
                                                            for k, v in results[True][-1].items()), file=sys.stderr)
    print(f"\nmedian of {args.runs} runs, {args.threads} threads, flash attention on; plain / repacked\n")
    print(f"{'':34} {'repacked':>9} {'plain':>9} {'ratio':>6}")
    for key in results[True][0]:
        on = statistics.median(r[key] for r in results[True])
        off = statistics.median(r[key] for r in results[False])
        print(f"{key:34} {on:9.3f} {off:9.3f} {off / on:6.2f}x")


if __name__ == "__main__":
    main()
