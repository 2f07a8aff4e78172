"""The `llava` command. Each command parses its options and hands over; convert and train load lazily.

Exit codes: 0 success, 1 failure (a one-line `llava: error: ...` on stderr), 2 usage error, 130 Ctrl-C.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer 0.2x carries its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as clickx
except ImportError:  # older typer runs on click itself
    from click import exceptions as clickx

from llavacli.errors import InputError, LlavaError

app = typer.Typer(
    name="llava",
    help="Chat with images on your own machine: LLaVA models run by llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"llava {version('llava-cli')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print llava's version and exit."),
) -> None:
    pass


# -- options shared by ask and chat ----------------------------------------------------------------------

ModelOpt = typer.Option(None, "--model", "-m", help="A GGUF file (its mmproj found beside it) or a preset name (see `llava models list`). Default: llava-1.5-7b.", show_default=False)
MmprojOpt = typer.Option(None, "--mmproj", help="The mmproj GGUF (vision tower + projector), when not beside the model.", show_default=False)
SystemOpt = typer.Option(None, "--system", help="System prompt instead of the template's own.")
TemplateOpt = typer.Option(None, "--template", help="Conversation template: vicuna_v1, llava_v1 or plain. Default: the one the GGUF names.", show_default=False)
TemperatureOpt = typer.Option(0.0, "--temperature", "-t", min=0.0, help="Sampling temperature; 0 decodes greedily.")
TopPOpt = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold (with --temperature > 0).")
SeedOpt = typer.Option(0, "--seed", help="Random seed: the same seed and options give the same answer.")
MaxTokensOpt = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens to generate per answer.")
CtxOpt = typer.Option(4096, "--ctx-size", "-c", min=64, help="Context length in tokens (image tokens count: 576 per LLaVA-1.5 image).")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads. Default: all cores.", show_default=False)


def _checked_by(parser: str, option: str):
    """A click callback that checks a value with llavacli.runtime's `parser`, which raises InputError; click
    names the option itself: "Invalid value for --x: must be ..."."""

    def check(value: str) -> str:
        from llavacli import runtime

        try:
            getattr(runtime, parser)(value)
        except InputError as e:
            raise clickx.BadParameter(str(e).removeprefix(f"{option} "), param_hint=option) from None
        return value

    return check


GpuLayersOpt = typer.Option("auto", "--gpu-layers", callback=_checked_by("parse_gpu_layers", "--gpu-layers"), help="LLM layers to offload to the GPU: auto (all that the build can), a number, or 0 for CPU only.")
FlashAttnOpt = typer.Option("auto", "--flash-attn", callback=_checked_by("flash_attn_setting", "--flash-attn"), help="Flash attention in the LLM: on, off, or auto (on with a GPU; on a CPU, on for ask, where it evaluates the image faster, and off for chat and eval: it decodes long conversations slower and rounds in f16).")
NoVisionOffloadOpt = typer.Option(False, "--no-vision-offload", help="Run the vision encoder on the CPU even when a GPU is available.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's log on stderr.")
NoCacheOpt = typer.Option(False, "--no-cache", help="Neither read nor write the image cache (see `llava cache info`).")


def _model_options(model, mmproj, ctx_size, threads, gpu_layers, flash_attn, no_vision_offload, verbose):
    from llavacli.runtime import ModelOptions

    return ModelOptions(model, mmproj, ctx_size, threads, gpu_layers, not no_vision_offload, verbose, flash_attn)


def _read_schema(schema: str) -> str:
    import json

    text = schema
    if not schema.lstrip().startswith("{"):
        path = Path(schema)
        if not path.is_file():
            raise InputError(f"--schema {schema}: neither JSON nor a readable file")
        text = path.read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--schema: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return text


@app.command()
def ask(
    args: List[str] = typer.Argument(..., metavar="[IMAGE]... PROMPT", help="Images (paths, URLs, or - for stdin), then the prompt.", show_default=False),
    images_from: Optional[str] = typer.Option(None, "--images-from", metavar="FILE", help="Read image paths one per line from FILE (- for stdin).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per answer: image, prompt, answer, tokens, seconds."),
    schema: Optional[str] = typer.Option(None, "--schema", metavar="JSON|FILE", help="Constrain the answer to this JSON schema.", show_default=False),
    model: Optional[str] = ModelOpt,
    mmproj: Optional[Path] = MmprojOpt,
    system: Optional[str] = SystemOpt,
    template: Optional[str] = TemplateOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    max_tokens: int = MaxTokensOpt,
    ctx_size: int = CtxOpt,
    threads: Optional[int] = ThreadsOpt,
    gpu_layers: str = GpuLayersOpt,
    flash_attn: str = FlashAttnOpt,
    no_vision_offload: bool = NoVisionOffloadOpt,
    no_cache: bool = NoCacheOpt,
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, metavar="N", help="With several images, decode N answers together in one batch. Default: as many as --ctx-size holds, up to 8; 1 answers one image at a time.", show_default=False),
    verbose: bool = VerboseOpt,
) -> None:
    """Answer PROMPT about each IMAGE once; the answer goes to stdout, everything else to stderr.

    \b
    llava ask photo.jpg "How many dogs are there?"
    llava ask *.jpg "Describe the scene." --json
    curl -s https://example.com/cat.png | llava ask - "What is this?"
    find . -name '*.png' | llava ask --images-from - "Is there text in this image?"
    """
    from llavacli.ask import run_ask, vision_first
    from llavacli.cache import open_cache
    from llavacli.engine import Sampling
    from llavacli.images import load_image, read_image_list
    from llavacli.runtime import open_engine, pick_template

    *sources, prompt = args
    if not sources and images_from is None and (prompt == "-" or Path(prompt).is_file()):
        raise clickx.UsageError(f"no PROMPT after the image {prompt} (llava ask IMAGE... PROMPT)")
    if images_from is not None:
        if "-" in sources and images_from == "-":
            raise clickx.UsageError("stdin cannot carry both an image (-) and the image list (--images-from -)")
        sources += read_image_list(images_from)
    if sources.count("-") > 1:
        raise clickx.UsageError("stdin (-) can be given as an image only once")
    sampling = Sampling(temperature, top_p, seed, max_tokens, _read_schema(schema) if schema else None)
    labelled = len(sources) > 1 or images_from is not None
    # One lone image is read before the model loads, so a bad path fails fast.
    loaders = None
    if sources:
        if not labelled:
            image = load_image(sources[0])
            loaders = [lambda: image]
        else:
            loaders = [lambda s=s: load_image(s) for s in sources]
    cache = open_cache(enabled=not no_cache)
    first = vision_first(template, system, prompt, None if labelled else image, cache) if sources else None
    # Several images are mostly prompt evaluation (576 tokens an image for LLaVA-1.5), which llama.cpp's
    # repacked weights slow down on a CPU: see llavacli.batch.
    options = _model_options(model, mmproj, ctx_size, threads, gpu_layers, flash_attn, no_vision_offload, verbose)
    engine = open_engine(options, flash_attn_auto=True, vision_first=first, repack=not labelled)
    try:
        failures = run_ask(
            engine,
            pick_template(template, engine),
            prompt,
            loaders,
            sampling,
            system=system,
            as_json=as_json,
            labelled=labelled,
            report_error=lambda msg: print(f"llava: error: {msg}", file=sys.stderr),
            cache=cache,
            parallel=parallel,
        )
    finally:
        engine.close()
    if failures:
        raise typer.Exit(1)


@app.command()
def chat(
    images: List[str] = typer.Argument(None, metavar="[IMAGE]...", help="Images to talk about (add more later with /image).", show_default=False),
    model: Optional[str] = ModelOpt,
    mmproj: Optional[Path] = MmprojOpt,
    system: Optional[str] = SystemOpt,
    template: Optional[str] = TemplateOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    seed: int = SeedOpt,
    max_tokens: int = MaxTokensOpt,
    ctx_size: int = CtxOpt,
    threads: Optional[int] = ThreadsOpt,
    gpu_layers: str = GpuLayersOpt,
    flash_attn: str = FlashAttnOpt,
    no_vision_offload: bool = NoVisionOffloadOpt,
    timings: bool = typer.Option(False, "--timings", help="After each answer, print its tokens and seconds on stderr."),
    no_cache: bool = NoCacheOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Talk about images interactively. Type /help inside for the commands.

    Each turn evaluates only its own new tokens: the image and the earlier turns stay in llama.cpp's cache.
    Without a terminal, turns are read line by line from stdin.
    """
    from llavacli.cache import embeddings_key, open_cache
    from llavacli.chat import ChatSession
    from llavacli.engine import Sampling
    from llavacli.images import load_image
    from llavacli.runtime import open_engine, pick_template

    loaded = [load_image(s) for s in images or []]
    cache = open_cache(enabled=not no_cache)
    first = (lambda e: not cache.has("emb", embeddings_key(e, loaded[0].sha256))) if loaded else None
    engine = open_engine(_model_options(model, mmproj, ctx_size, threads, gpu_layers, flash_attn, no_vision_offload, verbose), vision_first=first)
    try:
        session = ChatSession(engine, pick_template(template, engine), Sampling(temperature, top_p, seed, max_tokens), system, timings, cache)
        for image in loaded:
            session.add_image(image)
        session.run()
    finally:
        engine.close()


@app.command()
def convert(
    src: str = typer.Argument(..., help="A LLaVA checkpoint: a local directory or a Hugging Face repo id (llava-hf or original layout)."),
    out_dir: Path = typer.Argument(..., help="Where to write NAME.gguf and NAME.mmproj.gguf."),
    outtype: str = typer.Option("f16", "--outtype", help="f32, f16, q8_0 or q4_k_m (the text model; the mmproj stays f16, or f32 with f32)."),
    vision_tower: Optional[Path] = typer.Option(None, "--vision-tower", help="CLIP model directory for an original-layout checkpoint (default: its mm_vision_tower).", show_default=False),
    name: Optional[str] = typer.Option(None, "--name", help="Base name of the output files. Default: the checkpoint's folder name.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
) -> None:
    """Convert a trained LLaVA checkpoint into a GGUF pair that `llava ask` and llama.cpp run."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from convert import OUTTYPES
    from convert import convert as run_convert
    from llavacli.runtime import stderr_console

    if outtype not in OUTTYPES:
        raise clickx.BadParameter(f"{outtype!r} is not one of {', '.join(OUTTYPES)}", param_hint="--outtype")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=False, disable=not sys.stderr.isatty()) as progress:
        outputs = run_convert(src, out_dir, outtype, vision_tower=vision_tower, name=name, force=force, progress=progress)
    print(outputs.text)
    print(outputs.mmproj)


@app.command(name="eval")
def eval_(
    model: str = typer.Argument(..., help="A GGUF file (its mmproj found beside it) or a preset name, as --model of `llava ask`."),
    questions: Path = typer.Argument(..., help="Questions JSONL: one {\"text\", \"image\", \"answer\", \"kind\"} object per line; images relative to the file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write every prediction (JSONL). Default: QUESTIONS.MODEL.predictions.jsonl here.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace the predictions file if it exists."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions of each kind.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    mmproj: Optional[Path] = MmprojOpt,
    system: Optional[str] = SystemOpt,
    template: Optional[str] = TemplateOpt,
    max_tokens: int = typer.Option(16, "--max-tokens", "-n", min=1, help="Most tokens per answer (short answers need few)."),
    ctx_size: int = typer.Option(2048, "--ctx-size", "-c", min=64, help="Context length in tokens."),
    threads: Optional[int] = ThreadsOpt,
    gpu_layers: str = GpuLayersOpt,
    flash_attn: str = FlashAttnOpt,
    no_vision_offload: bool = NoVisionOffloadOpt,
    no_cache: bool = NoCacheOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Score MODEL on a questions file with LLaVA's rules, through the same runtime as `llava ask`.

    Short answers by normalised exact match, multiple choice (kind "multiple choice" or rule "letter") by the
    answer letter, yes/no questions POPE-style (accuracy, precision, recall, F1, yes-ratio). Greedy decoding.

    \b
    llava eval demo questions.jsonl
    llava eval model.gguf questions.jsonl --limit 50 --out preds.jsonl
    """
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llavacli.cache import open_cache
    from llavacli.eval import default_output, read_questions, run_eval, summary_table
    from llavacli.runtime import open_engine, pick_template, stderr_console

    records = read_questions(questions, limit)
    out = out or default_output(questions, model)
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it or --out to write elsewhere")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory for --out")
    with_images = any(r.get("image") for r in records)
    engine = open_engine(_model_options(model, mmproj, ctx_size, threads, gpu_layers, flash_attn, no_vision_offload, verbose), vision_first=lambda _: with_images)
    columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=stderr_console(), transient=True, disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task("", total=len(records))
            summary = run_eval(
                engine,
                pick_template(template, engine),
                records,
                out,
                max_tokens=max_tokens,
                system=system,
                cache=open_cache(enabled=not no_cache),
                progress=lambda n: bar.advance(task, n),
            )
    finally:
        engine.close()
    print(json.dumps(summary, indent=1) if as_json else summary_table(summary))
    print(f"predictions: {out}", file=sys.stderr)


@app.command()
def info(
    check: bool = typer.Option(False, "--check", help="Measure the backend's LLaVA conformance again instead of using the cached verdict."),
) -> None:
    """Version, llama.cpp backend (CPU/CUDA/Metal, GPU offload), its LLaVA conformance, and paths."""
    from importlib.metadata import version

    from llavacli import backend
    from llavacli.models import hub_cache_dir

    build = backend.build_info()
    verdict = backend.conformance(use_cache=not check)
    gpu = "GPU offload available" if build.gpu_offload else "CPU only (no GPU offload in this build)"
    lines = [
        ("llava-cli", version("llava-cli")),
        ("llama-cpp-python", f"{build.version}{'' if build.patched else ' (stock build)'}"),
        ("backend", f"{_backend_names(build.system_info)}; {gpu}"),
        ("LLaVA conformance", verdict.describe()),
        ("cache", str(backend.cache_dir())),
        ("model cache", str(hub_cache_dir())),
        ("libraries", build.library_dir),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    if not verdict.conformant and not verdict.detail:
        print(f"{'fix':<{width}}  {backend.FIX_HINT}")


def _backend_names(system_info: str) -> str:
    names = [n for n in ("CUDA", "Metal", "Vulkan", "ROCm", "SYCL") if n.upper() in system_info.upper()]
    return ", ".join(names + ["CPU"])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def train(ctx: typer.Context) -> None:
    """Train LLaVA: `llava train pretrain CONFIG [key=value ...]` or `llava train finetune CONFIG ...`.

    Run `llava train --help` for the stages, configs and overrides.
    """
    from train.cli import main as train_main

    raise typer.Exit(train_main(list(ctx.args)))


def _mount_subcommands() -> None:
    from llavacli.cache import cache_app
    from llavacli.models import models_app

    app.add_typer(models_app, name="models", help="List, download, remove and locate model presets.")
    app.add_typer(cache_app, name="cache", help="Show or clear the cache of image work (embeddings and prompt states).")


_mount_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: turns every failure into a one-line message and an exit code, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    try:
        rc = app(args=argv, prog_name="llava", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except clickx.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else e.format_message())
        return 0
    except clickx.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        print(f"llava: error: {e.format_message()}{hint}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except LlavaError as e:
        print(f"llava: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, with the traceback behind -v
        if verbose:
            raise
        print(f"llava: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1
