"""Which loads run on this build's GPU: stock llama-cpp-python, our engine, `llava`; each in its own process.

    python bench/gpu_diagnose.py

Written after CUDA backends compiled on an H200 machine (CUDA 13.0) made every `llava` process die of
SIGSEGV in llama_model_load_from_file (libstdc++'s number formatting under llama_model::print_info), while
stock `Llama()` ran: the probes below showed it strikes with the GPU hidden too, and only after our
process's own steps (gguf imported, libmtmd loaded). A backend built on the project's Debian box
(bench/cuda_wheel.sh) passed them all there. Where a probe fails, the script tries each of those steps alone
before a stock load, then workarounds; the first workaround that passes is written as a sitecustomize.py
that bench/gpu.sh runs the later steps with, and the first failing probe is rerun under cuda-gdb. Exit
status 1 when any probe failed. Never run by the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "llavacli" / "data" / "demo"
TINY = ROOT / "llavacli" / "data" / "conformance"
IMAGE = ROOT / "examples" / "shapes-1.png"
LLAVA = Path(sys.executable).parent / "llava"


def stock(model: Path, layers: int, verbose: bool) -> str:
    return (f"from llama_cpp import Llama; m = Llama({str(model)!r}, n_gpu_layers={layers}, verbose={verbose}); "
            "print(repr(m('USER: What is red? ASSISTANT:', max_tokens=4)['choices'][0]['text']))")


ENGINE = ("from PIL import Image; from llavacli.engine import Engine; "
          "e = Engine({text!r}, {proj!r}, n_ctx=256, n_gpu_layers={layers}); "
          f"print(e.image_embeddings(Image.open({str(IMAGE)!r})).shape)")

SELF_CHECK = "from llavacli.backend import measure_conformance; print(measure_conformance().describe())"

PROBES = {
    "stock Llama(), demo model (Q8_0, 192 wide), all layers, verbose": stock(DEMO / "demo.gguf", -1, True),
    "stock Llama(), demo model, all layers, quiet": stock(DEMO / "demo.gguf", -1, False),
    "stock Llama(), conformance model (F32, 32 wide), no layers, verbose": stock(TINY / "tiny.gguf", 0, True),
    "stock Llama(), conformance model, all layers, quiet": stock(TINY / "tiny.gguf", -1, False),
    "our log callback, then stock Llama(), demo model": "from llavacli import backend; backend.capture_logs(True); "
    + stock(DEMO / "demo.gguf", -1, True),
    "our Engine, demo pair, all layers": ENGINE.format(text=str(DEMO / "demo.gguf"), proj=str(DEMO / "demo.mmproj.gguf"), layers=-1),
    "the backend self-check (our Engine, conformance pair, no layers)": SELF_CHECK,
}
HIDDEN_GPU = {  # the same loads with the GPU hidden: a crash here is in the CPU code, not in CUDA
    "stock Llama(), conformance model, no layers, CUDA_VISIBLE_DEVICES=''": stock(TINY / "tiny.gguf", 0, False),
    "the backend self-check, CUDA_VISIBLE_DEVICES=''": SELF_CHECK,
}

# What our process does before its first load that a stock one does not, one thing at a time, each
# before the stock load of the conformance model that passes on its own.
STOCK_TINY = stock(TINY / "tiny.gguf", 0, False)
TRIGGERS = {
    "numpy imported first": "import numpy; ",
    "sentencepiece imported first (gguf imports it)": "import sentencepiece; ",
    "gguf imported first": "import gguf; ",
    "libmtmd loaded first": "import llama_cpp.mtmd_cpp; ",
    "a Python log callback set first": "import ctypes, llama_cpp; cb = llama_cpp.llama_log_callback(lambda *a: None); "
    "llama_cpp.llama_log_set(cb, ctypes.c_void_p(0)); ",
}
# Changes to our own process that would avoid the trigger; the first whose self-check passes is written
# to bench/out/gpu/site/sitecustomize.py, which bench/gpu.sh puts on PYTHONPATH for the steps after this.
WORKAROUNDS = {
    "llama_cpp and libmtmd loaded before anything else": "import llama_cpp, llama_cpp.mtmd_cpp\n",
    # the last resort: tests that build a SentencePiece tokenizer then fail, but `llava` and the timings run
    "sentencepiece kept out of the process": "import sys\nsys.modules.setdefault('sentencepiece', None)\n",
}
SITE = ROOT / "bench" / "out" / "gpu" / "site"
SYSTEM_INFO = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"


def probe(name: str, code: str, env: dict | None = None) -> bool:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ | (env or {}))
    last = (proc.stdout.strip() or proc.stderr.strip()).splitlines()[-1:] or [""]
    print(f"{outcome(proc.returncode):>20}  {name}: {last[0][:120]}", flush=True)
    return proc.returncode == 0


def outcome(returncode: int) -> str:
    if returncode < 0:
        return f"died of {signal.Signals(-returncode).name}"
    return "ok" if returncode == 0 else f"exit status {returncode}"


def main() -> None:
    info = subprocess.run([sys.executable, "-c", SYSTEM_INFO], capture_output=True, text=True, timeout=120)
    print("llama.cpp system info:", (info.stdout or info.stderr).strip()[-400:], flush=True)
    crashed = [code for name, code in PROBES.items() if not probe(name, code)]
    crashed += [code for name, code in HIDDEN_GPU.items() if not probe(name, code, {"CUDA_VISIBLE_DEVICES": ""})]
    proc = subprocess.run([str(LLAVA), "ask", "--model", "demo", str(IMAGE), "What shape is it?", "-n", "8", "--no-cache"],
                          capture_output=True, text=True, timeout=120)
    print(f"{outcome(proc.returncode):>20}  llava ask --model demo: {(proc.stdout or proc.stderr).strip()[-120:]}")
    if crashed or proc.returncode:
        print("\nwhat triggers it (each before the stock load of the conformance model):", flush=True)
        for name, prefix in TRIGGERS.items():
            probe(name, prefix + STOCK_TINY)
        print("\nworkarounds (the self-check after each):", flush=True)
        for name, code in WORKAROUNDS.items():
            if probe(name, code.replace("\n", "; ") + SELF_CHECK):
                SITE.mkdir(parents=True, exist_ok=True)
                (SITE / "sitecustomize.py").write_text(f"# bench/gpu_diagnose.py: {name}\n{code}")
                print(f"written to {SITE / 'sitecustomize.py'}; bench/gpu.sh runs the steps after this with it")
                break
    if crashed and shutil.which("cuda-gdb"):
        print("\ncuda-gdb, the first probe that failed:", flush=True)
        gdb = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", crashed[0]],
                             capture_output=True, text=True, timeout=180)
        lines = [ln for ln in gdb.stdout.splitlines() if not ln.startswith(("[New Thread", "[Thread", "warning"))]
        start = next((i for i, ln in enumerate(lines) if "signal" in ln.lower()), 0)
        print("\n".join(lines[start:start + 12]))
    sys.exit(1 if crashed or proc.returncode else 0)


if __name__ == "__main__":
    main()
