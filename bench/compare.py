"""`llava` against llama.cpp's own `llama-mtmd-cli` on a LLaVA-1.5-shaped pair with random weights.

    .venv/bin/python bench/compare.py            # CLIP ViT-L/14-336 + a ~0.8B LLaMA at Q4_K_M
    .venv/bin/python bench/compare.py --small    # the tests' tiny shape: checks the bench itself quickly

Builds (once, cached under bench/out/) the model pair with `llava convert --outtype q4_k_m` and
`llama-mtmd-cli` from the same llama.cpp source as the installed llama-cpp-python (its sdist with
backend/llava-cls-first.patch). Every row is the median of --runs runs, ours and theirs alternated,
with the same prompt text (system prompt included), greedy decoding, the same threads and token count.
Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
VENV_BIN = Path(sys.executable).parent
LLAVA = VENV_BIN / "llava"
VERSION = "0.3.36"
PATCH = ROOT / "backend" / "llava-cls-first.patch"
QUESTIONS = ["What is in the picture?", "What colour is the background?"]

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from llavacli.prompts import get_template  # noqa: E402

TEMPLATE = get_template("vicuna_v1")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- the model pair ------------------------------------------------------------------------------------


def build_pair(small: bool) -> tuple[Path, Path]:
    name = "small" if small else "llava15-1b"
    out = OUT / "pairs" / name
    text, proj = out / f"{name}.gguf", out / f"{name}.mmproj.gguf"
    if text.exists() and proj.exists():
        return text, proj
    import tinymodels  # torch and transformers: the bench's business, never the runtime's

    if small:
        shape = tinymodels.V15
    else:  # CLIP ViT-L/14-336 as LLaVA-1.5 uses it; a TinyLlama-like LLM (16 layers here)
        shape = tinymodels.Shape(
            vision_hidden=1024, vision_ff=4096, vision_layers=24, vision_heads=16,
            text_hidden=2048, text_ff=5632, text_layers=16, text_heads=32, text_kv_heads=4,
        )
        # The tests' large random weights would overflow at these widths; transformers' own init
        # (std 0.02) keeps the activations sane.
        tinymodels._randomize = lambda model, seed: None
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        log(f"building the {name} checkpoint")
        src = tinymodels.make_llava_hf(Path(tmp) / name, shape)
        log("converting with llava convert --outtype q4_k_m")
        subprocess.run([str(LLAVA), "convert", str(src), str(out), "--outtype", "q4_k_m", "--force"], check=True)
    return text, proj


# -- llama-mtmd-cli --------------------------------------------------------------------------------------


def build_mtmd_cli() -> Path:
    binary = OUT / "llama-mtmd-cli"
    if binary.exists():
        return binary
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        tmp = Path(tmp)
        log(f"downloading the llama-cpp-python {VERSION} sdist")
        subprocess.run(
            [str(VENV_BIN / "python"), "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={VERSION}", "-d", str(tmp)],
            check=True,
        )
        with tarfile.open(tmp / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / f"llama_cpp_python-{VERSION}"
        subprocess.run(["patch", "--quiet", "-p1", "-d", str(src), "-i", str(PATCH)], check=True)
        llama = src / "vendor" / "llama.cpp"
        build = tmp / "build"
        log("building llama-mtmd-cli (several minutes on 2 cores)")
        subprocess.run(
            ["cmake", "-S", str(llama), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            check=True, stdout=subprocess.DEVNULL,
        )
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-mtmd-cli", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        shutil.copy2(build / "bin" / "llama-mtmd-cli", binary)
    return binary


# -- running and measuring -----------------------------------------------------------------------------


def run_with_rss(cmd: list[str], stdin: str | None = None, env: dict | None = None) -> tuple[float, int, str, str]:
    """(wall seconds, this process's peak RSS in MB, stdout, stderr)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+", errors="replace") as fout, tempfile.TemporaryFile("w+", errors="replace") as ferr:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=fout, stderr=ferr, text=True, env=os.environ | (env or {}))
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        fout.seek(0), ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_maxrss // 1024, out, err


class Bench:
    def __init__(self, text: Path, proj: Path, mtmd: Path, threads: int, n_tokens: int, workdir: Path):
        self.text, self.proj, self.mtmd = text, proj, mtmd
        self.threads, self.n = threads, n_tokens
        self.cache = workdir / "cache"
        self.images = make_images(workdir, 8)

    def ours(self, images, question, *extra, cache: str = "cold"):
        """cache: 'cold' (emptied first), 'warm' (kept), 'off' (--no-cache)."""
        if cache == "cold":
            shutil.rmtree(self.cache, ignore_errors=True)
        args = [str(LLAVA), "ask", *map(str, images), question, "-m", str(self.text), "--mmproj", str(self.proj),
                "-n", str(self.n), "--threads", str(self.threads), "--json", *extra]
        if cache == "off":
            args.append("--no-cache")
        return run_with_rss(args, env={"LLAVA_CACHE": str(self.cache)})

    def theirs(self, image, question):
        # llama-mtmd-cli wraps -p in a chat template; its `vicuna` one with LLaVA's system text is the
        # closest to ours (it separates with newlines where LLaVA uses spaces: a few tokens apart).
        prompt = "<__media__>\n" + question
        args = [str(self.mtmd), "-m", str(self.text), "--mmproj", str(self.proj), "--image", str(image),
                "-p", prompt, "-sys", TEMPLATE.system, "--chat-template", "vicuna",
                "-n", str(self.n), "-t", str(self.threads), "--temp", "0", "-c", "4096",
                "--no-warmup", "-ngl", "0"]
        return run_with_rss(args)


def make_images(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"image{i}.png"
        if not path.exists():
            pixels = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def median(xs):
    return statistics.median(xs)


def decode_rate_theirs(stderr: str) -> float | None:
    m = re.search(r"eval time =\s*[\d.]+ ms /\s*\d+ (?:runs|tokens)\s*\(\s*[\d.]+ ms per token,\s*([\d.]+) tokens per second", stderr)
    return float(m.group(1)) if m else None


def decode_rate_ours(text: Path, proj: Path, threads: int, n: int, image: Path) -> float:
    """Tokens per second of generate() alone, in this process, after the prompt is evaluated."""
    from llavacli.engine import Engine, Sampling, Usage

    with Engine(text, proj, n_ctx=4096, n_threads=threads, n_gpu_layers=0) as engine:
        engine.feed(TEMPLATE.opening() + TEMPLATE.question(QUESTIONS[0], 1), [Image.open(image)])
        usage = Usage()
        start = time.perf_counter()
        for _ in engine.generate(Sampling(max_tokens=n), usage):
            pass
        took = time.perf_counter() - start
    return max(1, usage.generated_tokens) / took


def chat_turn_seconds(b: Bench, turns: int) -> dict[int, float]:
    lines = "\n".join(f"Question {i}: {QUESTIONS[i % 2]}" for i in range(turns)) + "\n"
    _, _, _, err = run_with_rss(
        [str(LLAVA), "chat", str(b.images[0]), "-m", str(b.text), "--mmproj", str(b.proj), "-n", str(b.n),
         "--threads", str(b.threads), "--timings", "--no-cache"],
        stdin=lines,
    )
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"turn (\d+): .*?, ([\d.]+) s", err)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tests' tiny shape: a quick check of the bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()

    mtmd = build_mtmd_cli()
    text, proj = build_pair(args.small)
    if args.build_only:
        print(mtmd, text, proj)
        return
    work = OUT / "run"
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(text, proj, mtmd, args.threads, args.tokens, work)
    img = b.images[0]
    rows = []

    log("one question, whole process (ours without cache, theirs)")
    ours1, theirs1, rss_o, rss_t, rate_t = [], [], [], [], []
    for _ in range(args.runs):
        w, r, _, _ = b.ours([img], QUESTIONS[0], cache="off")
        ours1.append(w), rss_o.append(r)
        w, r, _, err = b.theirs(img, QUESTIONS[0])
        theirs1.append(w), rss_t.append(r), rate_t.append(decode_rate_theirs(err) or float("nan"))
    rows.append(("one question, one image: llava / llama-mtmd-cli", median(ours1), median(theirs1), "<= 1.0"))

    log("second question about the same image, new process")
    first, second = [], []
    for _ in range(args.runs):
        first.append(b.ours([img], QUESTIONS[0], cache="cold")[0])
        second.append(b.ours([img], QUESTIONS[1], cache="warm")[0])
    rows.append(("second question, same image (cached) / first", median(second), median(first), "<= 0.3"))

    log("8 images: one llava ask against 8 llama-mtmd-cli processes")
    batch, eight = [], []
    for _ in range(args.runs):
        batch.append(b.ours(b.images, QUESTIONS[0], cache="off")[0])
        eight.append(sum(b.theirs(p, QUESTIONS[0])[0] for p in b.images))
    rows.append(("8 images: one llava ask / 8 llama-mtmd-cli", median(batch), median(eight), "<= 0.75"))

    log("chat: turn 10 against turn 2")
    t2, t10 = [], []
    for _ in range(args.runs):
        turns = chat_turn_seconds(b, 10)
        t2.append(turns[2]), t10.append(turns[10])
    rows.append(("llava chat: turn 10 / turn 2", median(t10), median(t2), "<= 1.2"))

    log("decode tokens/s")
    rate_o = [decode_rate_ours(text, proj, args.threads, args.tokens, img) for _ in range(args.runs)]
    rows.append(("decode tokens/s: llava / llama-mtmd-cli", median(rate_o), median(rate_t), ">= 0.95"))
    rows.append(("peak RSS MB: llava / llama-mtmd-cli", median(rss_o), median(rss_t), "<= 1.1"))

    print(f"\n{'pair':<10} {text.name} + {proj.name}, {args.threads} threads, {args.tokens} tokens, median of {args.runs}\n")
    print(f"| {'measure':<50} | {'ours':>9} | {'against':>9} | {'ratio':>6} | target  |")
    print(f"|{'-' * 52}|{'-' * 11}|{'-' * 11}|{'-' * 8}|---------|")
    for name, a, c, target in rows:
        print(f"| {name:<50} | {a:9.2f} | {c:9.2f} | {a / c:6.2f} | {target:<7} |")
    print(json.dumps({"rows": [dict(zip(("measure", "ours", "against", "ratio", "target"), (n, a, c, a / c, t))) for n, a, c, t in rows]}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
