"""The mmproj GGUF: the CLIP vision tower and the projector, in the layout of llama.cpp's tools/mtmd."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_TENSOR, GGUFWriter, Keys

from convert.checkpoint import Checkpoint
from convert.writing import TensorPlan, write_gguf
from llavacli.errors import ConvertError
from llavacli.ggufmeta import FEATURE_LAYER_KEY, IMAGE_MODE_KEY

PROJECTOR_TYPE = "mlp"  # clip.cpp's PROJECTOR_TYPE_MLP: LLaVA's projector, linear or two-layer
MM = gguf.TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ]  # "mm.{bid}"


def _vision_plans(ckpt: Checkpoint, float_type: np.dtype) -> list[TensorPlan]:
    n_layers = ckpt.vision.num_hidden_layers
    name_map = gguf.get_tensor_name_map(MODEL_ARCH.MMPROJ, n_layers)
    plans = []
    for name in ckpt.tensors.names("vision_tower."):
        if ".post_layernorm." in name or name.endswith("position_ids"):
            continue  # LLaVA reads a hidden state before the post-norm; position_ids are a buffer
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConvertError(f"cannot map vision tensor {name!r} to GGUF")
        plans.append(TensorPlan(gguf_name, ckpt.tensors.shape(name), lambda n=name: ckpt.tensors.get(n), float_type))
    return plans


def _projector_plans(ckpt: Checkpoint, float_type: np.dtype) -> list[TensorPlan]:
    t = ckpt.tensors
    if ckpt.projector == "mlp2x_gelu":
        return [
            TensorPlan(MM.format(bid=i) + "." + kind, t.shape(f"projector.{i}.{kind}"), lambda n=f"projector.{i}.{kind}": t.get(n), float_type)
            for i in (0, 2)
            for kind in ("weight", "bias")
        ]
    # LLaVA v1's projector is one Linear, but clip.cpp always applies GELU after mm.0. An exact identity
    # carries it through: gelu(y) - gelu(-y) = y for erf and tanh GELU alike, so mm.0 = [W; -W] (bias
    # [b; -b]) and mm.2 = [I, -I] (bias 0) compute W x + b.
    out_dim, in_dim = t.shape("projector.weight")
    eye = torch.eye(out_dim)
    return [
        TensorPlan("mm.0.weight", (2 * out_dim, in_dim), lambda: torch.cat([t.get("projector.weight"), -t.get("projector.weight")]), float_type),
        TensorPlan("mm.0.bias", (2 * out_dim,), lambda: torch.cat([t.get("projector.bias"), -t.get("projector.bias")]), float_type),
        TensorPlan("mm.2.weight", (out_dim, 2 * out_dim), lambda: torch.cat([eye, -eye], dim=1), float_type),
        TensorPlan("mm.2.bias", (out_dim,), lambda: torch.zeros(out_dim), float_type),
    ]


def projector_width(ckpt: Checkpoint) -> int:
    name = "projector.weight" if ckpt.projector == "linear" else "projector.2.weight"
    return ckpt.tensors.shape(name)[0]


def write_mmproj(ckpt: Checkpoint, path: Path, float_type: np.dtype, file_type: int, progress) -> None:
    v = ckpt.vision
    if projector_width(ckpt) != ckpt.text.hidden_size:
        raise ConvertError(f"projector outputs {projector_width(ckpt)} values but the LLM expects {ckpt.text.hidden_size}")
    if v.hidden_act not in ("quick_gelu", "gelu"):
        raise ConvertError(f"vision activation {v.hidden_act!r} is not supported")

    writer = GGUFWriter(path, "clip")
    writer.add_name(f"{ckpt.name} vision tower and projector")
    writer.add_file_type(file_type)
    writer.add_string(Keys.Clip.PROJECTOR_TYPE, PROJECTOR_TYPE)
    writer.add_bool(Keys.Clip.HAS_VISION_ENCODER, True)
    writer.add_bool(Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_bool(Keys.ClipVision.USE_GELU, v.hidden_act == "gelu")
    writer.add_uint32(Keys.ClipVision.IMAGE_SIZE, v.image_size)
    writer.add_uint32(Keys.ClipVision.PATCH_SIZE, v.patch_size)
    writer.add_uint32(Keys.ClipVision.EMBEDDING_LENGTH, v.hidden_size)
    writer.add_uint32(Keys.ClipVision.FEED_FORWARD_LENGTH, v.intermediate_size)
    writer.add_uint32(Keys.ClipVision.PROJECTION_DIM, ckpt.text.hidden_size)
    writer.add_uint32(Keys.ClipVision.BLOCK_COUNT, v.num_hidden_layers)
    writer.add_uint32(Keys.ClipVision.Attention.HEAD_COUNT, v.num_attention_heads)
    writer.add_float32(Keys.ClipVision.Attention.LAYERNORM_EPS, v.layer_norm_eps)
    writer.add_array(Keys.ClipVision.IMAGE_MEAN, list(ckpt.image_mean))
    writer.add_array(Keys.ClipVision.IMAGE_STD, list(ckpt.image_std))
    # Without this clip.cpp runs n_layer - 1 layers: one short of hidden state -2 when all are stored.
    writer.add_array(FEATURE_LAYER_KEY, [ckpt.feature_layer])
    writer.add_string(IMAGE_MODE_KEY, ckpt.image_mode)

    write_gguf(writer, _vision_plans(ckpt, float_type) + _projector_plans(ckpt, float_type), progress, "mmproj")
