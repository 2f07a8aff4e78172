"""One `llava ask` on the bench's LLaVA-1.5-shaped pair, all on the CPU against all on the GPU, alternated.

    python bench/offload.py [--runs 3] [--small]

Needs a GPU build of the backend (`make install GPU=cuda`, or bench/gpu.sh). Each run is a whole process
with --no-cache, as a first question: `--gpu-layers 0` (the LLM and, with it, the vision encoder on the
CPU) then `--gpu-layers 99` (every layer and the vision encoder on the GPU). Prints the median of each:
the whole process (start-up and model loading included) and the answer alone (image encode, prompt and
decode, as `--json` reports it), and their ratios. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics

import compare  # bench/compare.py: the pair, the images and the timed runs are the same as there

RUNS = {"CPU only (--gpu-layers 0)": "0", "full offload (--gpu-layers 99)": "99"}


def ask(text, proj, image, layers: str, tokens: int) -> tuple[float, float]:
    """(whole-process seconds, the answer's own seconds)."""
    run = compare.run([str(compare.LLAVA), "ask", str(image), compare.QUESTIONS[0], "-m", str(text), "--mmproj", str(proj),
                       "--template", compare.TEMPLATE.name, "-n", str(tokens), "--gpu-layers", layers, "--no-cache", "--json"])
    answer = json.loads(run.stdout.splitlines()[-1])
    return run.seconds, answer["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="the tests' tiny shape: a quick check of this script")
    args = parser.parse_args()
    text, proj = compare.build_pair(args.small)
    work = compare.OUT / "run"
    work.mkdir(parents=True, exist_ok=True)
    image = compare.make_images(work, 1)[0]
    for layers in RUNS.values():  # untimed: the files into the page cache, the backend's verdict measured
        ask(text, proj, image, layers, args.tokens)
    process = {name: [] for name in RUNS}
    answer = {name: [] for name in RUNS}
    for i in range(args.runs):
        compare.log(f"run {i + 1} of {args.runs}")
        for name, layers in RUNS.items():
            whole, alone = ask(text, proj, image, layers, args.tokens)
            process[name].append(whole), answer[name].append(alone)
    print(f"pair: {text.name} + {proj.name}; at most {args.tokens} tokens; median of {args.runs} runs, alternated")
    print(f"{'':32} {'whole process':>14} {'answer':>10}")
    for name in RUNS:
        print(f"{name:32} {statistics.median(process[name]):12.2f} s {statistics.median(answer[name]):8.2f} s")
    (cpu_p, gpu_p), (cpu_a, gpu_a) = ([statistics.median(d[n]) for n in RUNS] for d in (process, answer))
    print(f"full offload / CPU only: {gpu_p / cpu_p:.2f}x the whole process, {gpu_a / cpu_a:.2f}x the answer")


if __name__ == "__main__":
    main()
