"""What a run reports while it trains, from the main process only: a progress bar on stderr, a JSONL log
(one record per log step: step, epoch, loss, lr, grad_norm, samples/s, tokens/s), and TensorBoard scalars when
tensorboard is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

LOG_NAME = "log.jsonl"


class RunLog:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out_dir / LOG_NAME
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self._truncate(start_step)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps, ETA {remaining}{postfix}",
        )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def _truncate(self, start_step: int) -> None:
        """On resume, drop the records of steps after the checkpoint: they are about to be redone."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step(line) <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def step(self, record: dict, write: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {record['loss']:.4f}, lr {record['lr']:.3g}, {record['samples_per_s']:.2f} samples/s", refresh=False)
        if not write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _step(line: str) -> float:
    """A record's step; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line]
