"""`llava train ...` and `python -m train ...`: parse, check the config, then hand over to train.stages.

torch is imported only once a config has passed its checks, so `llava --help` and a mistyped key stay fast.
Exit codes: 0 done, 1 a one-line `llava train: error: ...` (bad config, data or model), 2 usage, 130 Ctrl-C.
"""

from __future__ import annotations

import os
import sys

from train.config import STAGES, SampleError, TrainError, describe_keys, load

USAGE = """\
usage: llava train pretrain CONFIG [key=value ...]    stage 1: train the projector (template plain)
       llava train finetune CONFIG [key=value ...]    stage 2: projector + LLM, fully or with LoRA (vicuna_v1)
       llava train scienceqa SCIENCEQA_DIR OUT.json [--split train] [--format QCM-LEA]
                                                      ScienceQA's problems.json + pid_splits.json -> LLaVA JSON
       llava train keys                               every config key, its default and meaning

CONFIG is a TOML file or the name of a shipped one (train/configs): {configs}.
Any key can be overridden after it: `lr=1e-4 output_dir=runs/x`. Under a launcher:
  torchrun --nproc_per_node 8 -m train finetune CONFIG
  accelerate launch -m train finetune CONFIG
  deepspeed --module train finetune CONFIG
A run resumes from the newest checkpoint in its output_dir (resume=auto)."""


def _usage() -> str:
    from train.config import CONFIG_DIR

    return USAGE.format(configs=", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))))


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


class UsageError(Exception):
    pass


def _train(command: str, args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        raise UsageError(f"{command} needs a CONFIG")
    cfg = load(args[0], args[1:])
    cfg.validate(command)
    from train.stages import run  # torch and transformers load here

    run(cfg)
    return 0


def _scienceqa(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="llava train scienceqa", add_help=False, exit_on_error=False)
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--split", default="train")
    parser.add_argument("--format", default="QCM-LEA")
    try:
        ns, extra = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit):
        raise UsageError("scienceqa needs SCIENCEQA_DIR OUT.json [--split S] [--format F]") from None
    if extra:
        raise UsageError(f"scienceqa: unexpected {' '.join(extra)}")
    from train.scienceqa import convert

    n = convert(ns.source, ns.out, split=ns.split, prompt_format=ns.format)
    print(f"{n} samples -> {ns.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = _drop_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    try:
        if command in STAGES:
            return _train(command, args)
        if command == "scienceqa":
            return _scienceqa(args)
        if command == "keys":
            print(describe_keys())
            return 0
        raise UsageError(f"unknown command {command!r}: choose {', '.join(STAGES)}, scienceqa or keys")
    except UsageError as e:
        if _is_main_process():
            print(f"llava train: usage error: {e} (llava train --help)", file=sys.stderr)
        return 2
    except TrainError as e:
        # Every process meets the same config, data and model errors: the first one says it. A sample that fails
        # mid-run fails in one process only, which says it (the last line: a data loader worker's error carries
        # the worker's traceback before it).
        if _is_main_process() or isinstance(e, SampleError):
            rank = "" if _is_main_process() else f" (process {os.environ['RANK']})"
            print(f"llava train: error{rank}: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
