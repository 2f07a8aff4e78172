"""Resumable checkpoints: OUTPUT/checkpoints/step-00000100/, written atomically.

A checkpoint is accelerate's save_state (weights, optimizer, RNG states of every process; DeepSpeed and FSDP
write their own shards) plus trainer_state.json. It is written to a hidden temporary directory and renamed into
place only once complete, so a run killed at any moment leaves either the whole checkpoint or none: the next run
with the same command (resume=auto) continues from the newest complete one. Frozen weights are left out (the
base models hold them), so a stage-1 checkpoint is the projector and its optimizer state, not the whole LLM.
With several nodes, output_dir must be on a filesystem they all see: every process writes its part, the first
renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from train.loop import maybe_die

DIR = "checkpoints"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def path_for(out_dir: Path, step: int) -> Path:
    return out_dir / DIR / f"step-{step:08d}"


def complete(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary directory left by a kill is not one)."""
    root = out_dir / DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def save(accelerator, out_dir: Path, step: int, state: dict, keep: int, **save_kwargs) -> Path:
    final = path_for(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        for stale in final.parent.glob(".step-*.tmp"):  # left by a run killed while writing
            shutil.rmtree(stale)
        final.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **save_kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        maybe_die("save", step)
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
