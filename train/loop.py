"""The optimisation loop: which samples each step sees, the learning rate, and the step itself.

Everything distributed is accelerate's (DDP, DeepSpeed ZeRO-2/3 or FSDP underneath); this file only decides
the arithmetic, which is the same whatever the engine and the number of processes:

- A step's samples are a function of the seed and the step alone: epoch e's order is a seeded permutation
  (optionally grouped by modality, as LLaVA-1.5's stage 2 does), cut into global batches; a process takes its
  own slices of each. One process with the whole global batch sees exactly the same samples per step as eight,
  and a resumed run picks up at the very step it stopped at.
- The loss of a step is the mean over every supervised token of the whole global batch (all micro-batches, all
  processes): each process sums its token losses and scales by the global count, so the gradient does not
  depend on how the batch was split.
- The learning rate is transformers' cosine schedule with linear warmup (warmup = ceil(ratio x steps)),
  evaluated at the number of steps already taken, as the HF Trainer that LLaVA used steps it.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from train.config import TrainError
from train.data import IGNORE

KILL_ENV = "LLAVA_TRAIN_KILL_AT"  # fault injection for the resume tests: "step:N" or "save:N" (SIGKILL there)


def maybe_die(where: str, step: int) -> None:
    if os.environ.get(KILL_ENV) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """transformers.get_cosine_schedule_with_warmup's multiplier after `step` optimizer steps."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(total * ratio)


@dataclass
class Plan:
    """Which sample indices every process sees at every step."""

    usable: list[int]
    lengths: dict[int, int]  # index -> length, negative for text-only (for grouping by modality)
    micro_batch: int
    world: int
    rank: int
    accumulation: int
    seed: int
    group_by_modality: bool
    _orders: dict = field(default_factory=dict, repr=False)  # the current epoch's order, computed once

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch: the last len % global_batch samples of each epoch's order sit out."""
        return len(self.usable) // self.global_batch

    def total_steps(self, epochs: float, max_steps: int) -> int:
        total = math.floor(epochs * self.steps_per_epoch)
        return min(total, max_steps) if max_steps else total

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        if self.group_by_modality:
            return self._grouped(gen)
        return [self.usable[i] for i in torch.randperm(len(self.usable), generator=gen).tolist()]

    def _grouped(self, gen: torch.Generator) -> list[int]:
        """After LLaVA's get_modality_length_grouped_indices: every forward pass over all processes (a megabatch
        of micro_batch x world samples) holds image samples only or text-only samples only, longest first."""
        size = self.micro_batch * self.world
        megabatches, tails = [], []
        for group in ([i for i in self.usable if self.lengths[i] > 0], [i for i in self.usable if self.lengths[i] < 0]):
            shuffled = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            chunks = [shuffled[k : k + size] for k in range(0, len(shuffled), size)]
            if chunks and len(chunks[-1]) < size:
                tails += chunks.pop()
            megabatches += chunks
        megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=gen).tolist()]
        if tails:
            megabatches.append(sorted(tails))
        by_length = lambda i: -abs(self.lengths[i])  # noqa: E731
        return [i for mb in megabatches for i in sorted(mb, key=by_length)]

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: self.order(epoch)}
        batch = self._orders[epoch][within * self.global_batch : (within + 1) * self.global_batch]
        # Micro-step m of every process together covers one contiguous megabatch of the global batch.
        return [
            batch[(m * self.world + self.rank) * self.micro_batch : (m * self.world + self.rank + 1) * self.micro_batch]
            for m in range(self.accumulation)
        ]


class StepSampler(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: this process's micro-batches from `start` to `stop`, in order."""

    def __init__(self, plan: Plan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accumulation


def summed_loss(model, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropies over the supervised positions of one micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE
    return F.cross_entropy(logits[:, :-1][supervised].float(), labels[supervised], reduction="sum")


def supervised_tokens(batches: list[dict]) -> int:
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


def train(accelerator, model, optimizer, base_lrs, loader, plan: Plan, start: int, total: int, cfg, log, checkpoint) -> float:
    """Run steps start..total-1. Returns the last step's loss."""
    warmup = warmup_steps(total, cfg.warmup_ratio)
    device = accelerator.device
    model.train()
    batches = iter(loader)
    loss = float("nan")
    for step in range(start, total):
        began = time.perf_counter()
        factor = lr_factor(step, total, warmup)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        micro = [next(batches) for _ in range(plan.accumulation)]
        count = accelerator.reduce(torch.tensor(supervised_tokens(micro), device=device), reduction="sum")
        scale = plan.world * plan.accumulation / count.clamp(min=1)  # undoes accelerate's/DeepSpeed's means
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for batch in micro:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                part = summed_loss(model, batch)
                accelerator.backward(part * scale)
                loss_sum += part.detach()
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        loss = (accelerator.reduce(loss_sum, reduction="sum") / count.clamp(min=1)).item()
        done = step + 1
        elapsed = time.perf_counter() - began
        record = {
            "step": done,
            "epoch": round(done / plan.steps_per_epoch, 4),
            "loss": loss,
            "lr": cfg.lr * factor,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": plan.global_batch / elapsed,
            "tokens": int(count),
        }
        log.step(record, write=done % cfg.log_steps == 0 or done == total)
        if not math.isfinite(loss):
            raise TrainError(f"the loss is {loss} at step {done}; lower lr, or check the data around this step in {log.path}")
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total:
            checkpoint(done)
        maybe_die("step", done)
    return loss
