"""From command-line options to a loaded engine: model resolution, the backend check, and a spinner."""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

from llavacli.errors import InputError
from llavacli.prompts import Template, get_template


@functools.cache
def stderr_console():
    """rich's console on stderr, made on first use: importing rich costs every command 30 ms."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@dataclass
class ModelOptions:
    model: str | None = None
    mmproj: Path | None = None
    ctx_size: int = 4096
    threads: int | None = None
    gpu_layers: str = "auto"
    vision_offload: bool = True
    verbose: bool = False
    flash_attn: str = "auto"


def parse_gpu_layers(value: str) -> int:
    """auto = everything that fits the backend (all layers; 0 on a CPU-only build), else a count."""
    if value == "auto":
        return -1
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"--gpu-layers must be auto or a number, not {value!r}") from None
    if n < 0:
        raise InputError(f"--gpu-layers must be auto or a number >= 0, not {value!r}")
    return n


FLASH_ATTN = ("auto", "on", "off")


def flash_attn_setting(value: str, auto: bool | None = None) -> bool | None:
    """--flash-attn for the LLM: on, off, or auto, which is what the command asks for; None leaves it to the
    engine (on where layers go to a GPU, else off).

    On a CPU llama.cpp's flash attention evaluates a prompt faster (an image's 576 tokens 11% faster on this
    project's 2-core CPU), decodes slower the longer the context (2% at 700 positions, 7% at 1500), and
    accumulates in f16 (logits at cosine 0.999995 to transformers instead of 1.0000000). So `ask` turns it
    on; `chat`, whose later turns decode deep into the context, and `eval`, which measures the model, leave
    it to the engine.
    """
    if value not in FLASH_ATTN:
        raise InputError(f"--flash-attn must be auto, on or off, not {value!r}")
    return auto if value == "auto" else value == "on"


def warn(message: str) -> None:
    stderr_console().print(f"[yellow]llava: warning:[/] {message}", soft_wrap=True)


@contextlib.contextmanager
def status(message: str):
    """A transient note on a terminal's stderr while something loads; nothing on a pipe or file.

    Not rich's spinner: its refresh thread leaves Ctrl-C unanswered for the rest of the process.
    """
    tty = sys.stderr.isatty()
    if tty:
        sys.stderr.write(f"{message}…")
        sys.stderr.flush()
    try:
        yield
    finally:
        if tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def check_backend() -> None:
    from llavacli import backend

    verdict = backend.conformance()
    if verdict.detail:
        warn(f"{verdict.detail} (`llava info --check` runs it again)")
    elif not verdict.conformant:
        warn(f"this llama.cpp build is {verdict.describe()}. Fix: {backend.FIX_HINT}")


def open_engine(opts: ModelOptions, flash_attn_auto: bool | None = None, vision_first=None, repack: bool = True):
    from llavacli.engine import Engine
    from llavacli.models import resolve_model

    n_gpu_layers = parse_gpu_layers(opts.gpu_layers)
    flash_attn = flash_attn_setting(opts.flash_attn, flash_attn_auto)
    text, mmproj = resolve_model(opts.model, opts.mmproj)
    with status(f"loading {Path(text).name}"):
        check_backend()
        return Engine(
            Path(text),
            Path(mmproj),
            n_ctx=opts.ctx_size,
            n_threads=opts.threads,
            n_gpu_layers=n_gpu_layers,
            vision_offload=opts.vision_offload,
            flash_attn=flash_attn,
            repack=repack,
            verbose=opts.verbose,
            vision_first=vision_first,
        )


def pick_template(name: str | None, engine) -> Template:
    try:
        return get_template(name or engine.template_name)
    except ValueError as e:
        raise InputError(str(e)) from None
