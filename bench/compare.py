"""`llava` against llama.cpp's own `llama-mtmd-cli` on a LLaVA-1.5-shaped pair with random weights.

    .venv/bin/python bench/compare.py            # CLIP ViT-L/14-336 + a ~1B LLaMA (TinyLlama-1.1B shape) at Q4_K_M
    .venv/bin/python bench/compare.py --small    # the tests' tiny shape: checks the bench itself quickly
    .venv/bin/python bench/compare.py --gpu-layers 99   # both tools with every layer on the GPU (a CUDA build)

Builds (once, cached under bench/out/) the model pair with `llava convert --outtype q4_k_m` and
`llama-mtmd-cli` from the same llama.cpp source as the installed llama-cpp-python (its sdist with
backend/*.patch). Every row is the median of --runs runs, ours and theirs alternated, its
ratio the median of the runs' ratios, with the same prompt text (system prompt included), greedy
decoding, the same threads, token count,
context, batch sizes, offload and flash attention (on: llama-mtmd-cli's default and `llava ask`'s). `llava`
starts each measured run with a fresh, empty LLAVA_CACHE, as on a first question. Prints the table, then
the same as Markdown for a README.
Never run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
VENV_BIN = Path(sys.executable).parent
LLAVA = VENV_BIN / "llava"
VERSION = "0.3.36"
PATCHES = sorted((ROOT / "backend").glob("*.patch"))  # as backend/build.sh applies them
QUESTIONS = ["What is in the picture?", "What colour is the background?"]
N_CTX = 4096  # `llava`'s default --ctx-size
N_BATCH = 2048  # the engine's n_batch and n_ubatch at that context
MEDIA_MARKER = "<__media__>"  # llama-mtmd-cli's image placeholder in -p
RAW_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"  # -p as it is, no chat template around it
GNU_TIME = "/usr/bin/time"

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from llavacli.prompts import IMAGE, get_template  # noqa: E402

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
    else:  # CLIP ViT-L/14-336 as LLaVA-1.5 uses it; a TinyLlama-1.1B-shaped LLM
        shape = tinymodels.Shape(
            vision_hidden=1024, vision_ff=4096, vision_layers=24, vision_heads=16,
            text_hidden=2048, text_ff=5632, text_layers=22, text_heads=32, text_kv_heads=4,
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
    """llama-mtmd-cli, built again whenever backend/*.patch change (as the installed backend is)."""
    binary, stamp = OUT / "llama-mtmd-cli", OUT / "llama-mtmd-cli.patches"
    patches = "".join(p.read_text() for p in PATCHES)
    if binary.exists() and stamp.exists() and stamp.read_text() == patches:
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
        for patch in PATCHES:
            subprocess.run(["patch", "--quiet", "-p1", "-d", str(src), "-i", str(patch)], check=True)
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
        stamp.write_text(patches)
    return binary


# -- running and measuring -----------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # wall clock, process start to exit
    rss_mb: float  # this process's peak resident set
    stdout: str
    stderr: str


def run(cmd: list[str], stdin: str | None = None, env: dict | None = None) -> Run:
    """Run one process to its end, under GNU time for its peak RSS.

    Not wait4()'s: Python starts children with vfork, so their ru_maxrss includes this process's own peak.
    """
    timed = os.path.exists(GNU_TIME)  # missing on some machines: then the RSS rows read nan
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if timed else cmd, input=stdin,
                              stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True,
                              text=True, errors="replace", env=os.environ | (env or {}))
        seconds = time.perf_counter() - start
        kib = float(rss.read().split()[-1]) if timed else float("nan")  # its last word: after "Command exited..."
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return Run(seconds, kib / 1024, proc.stdout, proc.stderr)


def prompt_text(question: str) -> str:
    """What both tools evaluate: system prompt, the image, the question, up to 'ASSISTANT:'."""
    return TEMPLATE.opening() + TEMPLATE.question(question, 1)


class Bench:
    def __init__(self, text: Path, proj: Path, mtmd: Path, threads: int, n_tokens: int, workdir: Path, gpu_layers: int = 0):
        self.text, self.proj, self.mtmd = text, proj, mtmd
        self.threads, self.n, self.gpu_layers = threads, n_tokens, gpu_layers
        self.work = workdir
        self.verdict = workdir / "cache" / "conformance.json"  # written by warm_up()
        self.images = make_images(workdir, 8)

    def ours(self, images: list[Path], question: str, cache: Path) -> Run:
        args = [str(LLAVA), "ask", *map(str, images), question, "--json", *self._our_options()]
        return run(args, env={"LLAVA_CACHE": str(cache)})

    def chat(self, questions: list[str], cache: Path) -> Run:
        args = [str(LLAVA), "chat", str(self.images[0]), "--timings", *self._our_options()]
        return run(args, stdin="".join(q + "\n" for q in questions), env={"LLAVA_CACHE": str(cache)})

    def _our_options(self) -> list[str]:
        return ["-m", str(self.text), "--mmproj", str(self.proj), "--template", TEMPLATE.name,
                "-n", str(self.n), "--threads", str(self.threads), "--gpu-layers", str(self.gpu_layers)]

    def theirs(self, image: Path, question: str) -> Run:
        return run(self.theirs_command(image, question))

    def theirs_command(self, image: Path, question: str) -> list[str]:
        """llama-mtmd-cli set up as our engine is: the same prompt, context, batch sizes and threads.

        --jinja with RAW_TEMPLATE passes -p through unchanged, so both tokenize the same text (a -sys message
        would be tokenized on its own, one token longer). -fa on: what its default, auto, picks on a CPU and a
        GPU alike, and what `llava ask` uses (`llava chat` keeps it off on a CPU; its row compares llava with
        itself). -lv 4 lets llama.cpp's timings through.
        """
        return [str(self.mtmd), "-m", str(self.text), "--mmproj", str(self.proj), "--image", str(image),
                "-p", prompt_text(question).replace(IMAGE, MEDIA_MARKER), "--jinja", "--chat-template", RAW_TEMPLATE,
                "-n", str(self.n), "--temp", "0", "-t", str(self.threads), "-tb", str(self.threads),
                "-c", str(N_CTX), "-b", str(N_BATCH), "-ub", str(N_BATCH), "-fa", "on",
                "--no-warmup", "-ngl", str(self.gpu_layers), "-lv", "4"]

    @contextlib.contextmanager
    def cold_cache(self):
        """A fresh LLAVA_CACHE: no image entries, only the backend's conformance verdict (one per build)."""
        with tempfile.TemporaryDirectory(dir=self.work, prefix="cache-") as tmp:
            shutil.copy2(self.verdict, Path(tmp) / self.verdict.name)
            yield Path(tmp)

    def warm_up(self) -> None:
        """One untimed run of each: the files are in the page cache, and our conformance verdict is measured."""
        run([str(LLAVA), "ask", str(self.images[0]), QUESTIONS[0], "--no-cache", *self._our_options()],
            env={"LLAVA_CACHE": str(self.verdict.parent)})
        self.theirs(self.images[0], QUESTIONS[0])


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


# llama_perf_context_print, at the end of llama-mtmd-cli's log:
#   ... llama_perf_context_print: prompt eval time =  377.47 ms /   712 tokens (  0.53 ms per token, 1886.27 tokens per second)
#   ... llama_perf_context_print:        eval time =  374.99 ms /    63 runs   (  5.95 ms per token,  168.00 tokens per second)
PERF_LINE = re.compile(
    r"llama_perf_context_print:\s+(prompt eval|eval) time =\s*[\d.]+ ms /\s*(\d+) (?:tokens|runs)\s*"
    r"\(\s*[\d.]+ ms per token,\s*([\d.]+) tokens per second\)"
)


def theirs_perf(stderr: str) -> dict[str, tuple[int, float]]:
    """{'prompt eval': (tokens, tokens/s), 'eval': (tokens, tokens/s)} from llama-mtmd-cli's log."""
    perf = {m.group(1): (int(m.group(2)), float(m.group(3))) for m in PERF_LINE.finditer(stderr)}
    if set(perf) != {"prompt eval", "eval"}:
        raise RuntimeError(f"llama-mtmd-cli printed no timings (is -lv 4 still honoured?): {stderr[-2000:]}")
    return perf


def our_decode(b: Bench, image: Path) -> tuple[float, float, int]:
    """(tokens/s of generate() by the wall clock, tokens/s by llama.cpp's own 'eval time', prompt tokens), in
    this process, after the prompt is evaluated.

    The first includes our sampling and detokenizing in Python; the second is the same counter that
    llama-mtmd-cli prints, so it compares like with like.
    """
    import llama_cpp

    from llavacli.engine import Engine, Sampling, Usage
    from llavacli.runtime import flash_attn_setting

    fa = flash_attn_setting("auto", True)  # as `llava ask` runs
    with Engine(b.text, b.proj, n_ctx=N_CTX, n_threads=b.threads, n_gpu_layers=b.gpu_layers, flash_attn=fa) as engine:
        engine.feed(prompt_text(QUESTIONS[0]), [Image.open(image)])
        n_prompt = engine.n_past
        before = llama_cpp.llama_perf_context(engine.llama.ctx)
        usage = Usage()
        start = time.perf_counter()
        for _ in engine.generate(Sampling(max_tokens=b.n), usage):
            pass
        took = time.perf_counter() - start
        after = llama_cpp.llama_perf_context(engine.llama.ctx)
    n_eval, eval_ms = after.n_eval - before.n_eval, after.t_eval_ms - before.t_eval_ms
    return max(1, usage.generated_tokens) / took, 1000 * n_eval / eval_ms, n_prompt


def chat_turn_seconds(b: Bench, cache: Path, turns: int) -> dict[int, float]:
    questions = [f"Question {i + 1}: {QUESTIONS[i % 2]}" for i in range(turns)]
    err = b.chat(questions, cache).stderr
    seconds = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"turn (\d+): .*?, ([\d.]+) s", err)}
    if len(seconds) != turns:
        raise RuntimeError(f"llava chat reported {len(seconds)} of {turns} turns: {err[-2000:]}")
    return seconds


# -- the rows ------------------------------------------------------------------------------------------


def number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


@dataclass
class Row:
    measure: str
    unit: str
    ours: list[float]
    against: list[float]
    against_what: str
    op: str  # "<=" or ">=": how the ratio ours / against must compare with the target
    target: float

    @property
    def ratio(self) -> float:
        """The median of each run's ratio: a run's two measures are taken within seconds of each other,
        while this machine (a VM) drifts by up to 10% over the minutes a row takes."""
        return statistics.median(o / a for o, a in zip(self.ours, self.against))

    @property
    def met(self) -> bool:
        return self.ratio <= self.target if self.op == "<=" else self.ratio >= self.target

    def cells(self) -> list[str]:
        ours, against = statistics.median(self.ours), statistics.median(self.against)
        return [self.measure, f"{number(ours)} {self.unit}", f"{number(against)} {self.unit} ({self.against_what})",
                f"{self.ratio:.2f}x", f"{self.op} {self.target}x", "yes" if self.met else "NO"]


HEADINGS = ["measure", "llava", "against", "ratio", "target", "met"]


def one_question(b: Bench, runs: int) -> tuple[list[Row], list[Row], tuple[int, int]]:
    """The time rows, the resource rows (decode speed, RSS), and the prompt tokens (ours, theirs).

    Per run: ours with a cold cache, theirs, ours again with that cache warm, our decode in this process.
    """
    img = b.images[0]
    cold, warm, theirs, rate_o, eval_o, rate_t, rss_o, rss_t = [], [], [], [], [], [], [], []
    for i in range(runs):
        log(f"one question: run {i + 1} of {runs}")
        with b.cold_cache() as cache:
            first = b.ours([img], QUESTIONS[0], cache)
            other = b.theirs(img, QUESTIONS[0])
            second = b.ours([img], QUESTIONS[1], cache)
        rate, eval_rate, n_ours = our_decode(b, img)
        perf = theirs_perf(other.stderr)
        cold.append(first.seconds), warm.append(second.seconds), theirs.append(other.seconds)
        rss_o.append(first.rss_mb), rss_t.append(other.rss_mb)
        rate_o.append(rate), eval_o.append(eval_rate), rate_t.append(perf["eval"][1])
    times = [
        Row("one question, one image, whole process", "s", cold, theirs, "llama-mtmd-cli", "<=", 1.0),
        Row("second question, same image, new process (cache warm)", "s", warm, cold,
            "llava, first question, cache cold", "<=", 0.3),
    ]
    resources = [
        Row("decode speed (ours: generate() wall clock, Python included)", "tok/s", rate_o, rate_t, "llama-mtmd-cli eval time", ">=", 0.95),
        Row("decode speed (both: llama.cpp eval time)", "tok/s", eval_o, rate_t, "llama-mtmd-cli eval time", ">=", 0.95),
        Row("peak RSS, one question", "MB", rss_o, rss_t, "llama-mtmd-cli", "<=", 1.1),
    ]
    return times, resources, (n_ours, perf["prompt eval"][0])


def eight_images(b: Bench, runs: int) -> Row:
    batch, processes = [], []
    for i in range(runs):
        log(f"8 images: run {i + 1} of {runs}")
        with b.cold_cache() as cache:
            batch.append(b.ours(b.images, QUESTIONS[0], cache).seconds)
        processes.append(sum(b.theirs(p, QUESTIONS[0]).seconds for p in b.images))
    return Row("8 images, one question: one llava ask", "s", batch, processes,
               "8 llama-mtmd-cli processes", "<=", 0.75)


def chat_turns(b: Bench, runs: int) -> Row:
    t2, t10 = [], []
    for i in range(runs):
        log(f"chat: run {i + 1} of {runs}")
        with b.cold_cache() as cache:
            turns = chat_turn_seconds(b, cache, 10)
        t2.append(turns[2]), t10.append(turns[10])
    return Row("llava chat, turn 10", "s", t10, t2, "llava chat, turn 2", "<=", 1.2)


# -- the report ----------------------------------------------------------------------------------------


def preamble(b: Bench, runs: int, prompt_tokens: tuple[int, int], load: float) -> list[str]:
    ours, theirs = prompt_tokens
    return [
        f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}",
        f"pair: {b.text.name} + {b.proj.name}; median of {runs} runs, llava and llama-mtmd-cli alternated, ratios the median of each run's; "
        "llava starts each run with a fresh LLAVA_CACHE (cold, as on a first question)",
        f"both: {f'{b.gpu_layers} layers offloaded' if b.gpu_layers else 'CPU only'}, {b.threads} threads, "
        f"context {N_CTX}, batch and ubatch {N_BATCH}, greedy, {b.n} tokens, the same prompt text ({ours} tokens for llava, {theirs} for llama-mtmd-cli)",
        "flash attention: on in the LLM and the vision encoder for both (llama-mtmd-cli -fa on, its default auto's "
        "choice; `llava ask`'s --flash-attn auto); `llava chat` keeps it off in the LLM on a CPU",
        f"machine: {os.cpu_count()} CPUs, load average {load:.2f} when the bench started",
    ]


def plain_table(rows: list[Row]) -> str:
    lines = [HEADINGS] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADINGS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(rows: list[Row]) -> str:
    lines = [HEADINGS, ["---"] * len(HEADINGS)] + [row.cells() for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tests' tiny shape: a quick check of the bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--gpu-layers", type=int, default=0, help="LLM layers both tools offload (a GPU build)")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    mtmd = build_mtmd_cli()
    text, proj = build_pair(args.small)
    if args.build_only:
        print(mtmd, text, proj)
        return
    work = OUT / "run"
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(text, proj, mtmd, args.threads, args.tokens, work, args.gpu_layers)
    log("warming up: one untimed run of each")
    b.warm_up()
    log(f"llama-mtmd-cli runs as: {shlex.join(b.theirs_command(b.images[0], QUESTIONS[0]))}")
    times, resources, prompt_tokens = one_question(b, args.runs)
    rows = [*times, eight_images(b, args.runs), chat_turns(b, args.runs), *resources]

    head = preamble(b, args.runs, prompt_tokens, load)
    print("\n".join(["", *head, "", plain_table(rows), ""]))
    print("Markdown:\n")
    print("\n".join([*(f"{line}  " for line in head), "", markdown_table(rows)]))
    print(json.dumps({"rows": [{"measure": r.measure, "ours": r.ours, "against": r.against, "ratio": r.ratio,
                                "target": f"{r.op} {r.target}"} for r in rows]}), file=sys.stderr)


if __name__ == "__main__":
    main()
