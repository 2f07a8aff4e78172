"""Streaming tensors into a GGUFWriter: header first, then one tensor at a time, with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGUFWriter


@dataclass
class TensorPlan:
    name: str  # the GGUF tensor name
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    float_type: np.dtype  # for weight matrices; vectors and position tables stay float32

    @property
    def dtype(self) -> np.dtype:
        keep_f32 = len(self.shape) < 2 or "position_embd" in self.name
        return np.dtype(np.float32) if keep_f32 else np.dtype(self.float_type)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def write_gguf(writer: GGUFWriter, plans: list[TensorPlan], progress, label: str) -> None:
    """Write the header, then each tensor as it loads; `progress` is a rich Progress or None."""
    for plan in plans:
        writer.add_tensor_info(plan.name, plan.shape, plan.dtype, plan.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    task = progress.add_task(label, total=sum(p.nbytes for p in plans)) if progress else None
    for plan in plans:
        array = plan.load().numpy().astype(plan.dtype)
        if array.shape != plan.shape:
            raise ValueError(f"{plan.name}: planned shape {plan.shape}, loaded {array.shape}")
        writer.write_tensor_data(array)
        if task is not None:
            progress.advance(task, plan.nbytes)
    writer.close()
