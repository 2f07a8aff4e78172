"""Tiny LLaVA checkpoints built with transformers, in both layouts the converter takes.

Every model is random but seeded, small enough to build in about a second, and shaped like the real ones
where the shape matters to llama.cpp: 336 px / 14 px patches (576 image tokens) for v1.5, 224 px (256) for
v1, grouped-query attention in the LLM, and a SentencePiece tokenizer trained here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from train.miniature.language import train_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WORDS = (
    "a an the red green blue yellow purple orange circle square triangle star one two three four five "
    "left right top bottom big small of is are there what how many color shape image picture shows on "
    "in and with background dog cat photo answer question describe which most"
).split()


@dataclass(frozen=True)
class Shape:
    """The sizes of one tiny LLaVA."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_ff: int = 160  # never equal to vision_hidden: clip.cpp would take equal sizes for swapped weights
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 96
    text_ff: int = 192
    text_layers: int = 2
    text_heads: int = 6
    text_kv_heads: int = 2
    projector: str = "mlp2x_gelu"  # or "linear" (LLaVA v1)


V15 = Shape()
V1 = Shape(image_size=224, projector="linear")


def train_sentencepiece(out_dir: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """A LLaMA-style SentencePiece model trained on seeded text (the project's own trainer).

    As LLaMA's: unk 0, bos 1, eos 2, byte fallback, split digits, a dummy prefix, and no normaliser (identity,
    whitespace kept): "USER: " keeps its trailing "▁", which LLaVA's prompts rely on.
    """
    rng = random.Random(seed)
    sentences = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!")
        for _ in range(3000)
    ]
    path = train_tokenizer(out_dir, sentences, vocab_size, seed=seed)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return path


def hf_tokenizer(spm_dir: Path, *, image_token: bool):
    """The transformers tokenizer for a SentencePiece model; llava-hf adds `<image>` then `<pad>`."""
    tok = AutoTokenizer.from_pretrained(spm_dir)
    if image_token:
        tok.add_tokens(["<image>"], special_tokens=True)
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def _vision_config(shape: Shape) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_ff,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _text_config(shape: Shape, vocab_size: int, pad_token_id: int | None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_ff,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every layer changes the answer: a conversion error cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layernorm" in name or "ln" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def make_llava_hf(out_dir: Path, shape: Shape = V15, seed: int = 0) -> Path:
    """A llava-hf checkpoint: LlavaForConditionalGeneration with the tower, safetensors, `<image>` added."""
    assert shape.projector == "mlp2x_gelu", "llava-hf has no linear projector"
    out_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(out_dir, seed=seed)
    tok = hf_tokenizer(out_dir, image_token=True)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vocab = (len(tok) + 63) // 64 * 64  # llava-hf pads the embedding rows (32002 -> 32064)
    config = LlavaConfig(
        vision_config=_vision_config(shape),
        text_config=_text_config(shape, vocab, tok.pad_token_id),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(shape.image_size // shape.patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(out_dir)
    return out_dir


def make_clip_tower(out_dir: Path, shape: Shape = V15, seed: int = 1) -> Path:
    """A CLIP vision tower directory, as `mm_vision_tower` names one."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(_vision_config(shape)).eval()
    _randomize(tower, seed)
    tower.save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(out_dir)
    return out_dir


def make_llava_original(
    out_dir: Path,
    tower_dir: Path,
    shape: Shape = V15,
    seed: int = 2,
    *,
    bin_shards: bool = True,
) -> Path:
    """The original LLaVA layout: LlavaLlamaForCausalLM with `model.mm_projector.*`, no tower inside."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(out_dir, seed=seed)
    tok = hf_tokenizer(out_dir, image_token=False)
    text_cfg = _text_config(shape, len(tok), None)
    gen = torch.Generator().manual_seed(seed)

    def rand(*dims, scale=0.08):
        return scale * torch.randn(*dims, generator=gen)

    h, ff, v = shape.text_hidden, shape.text_ff, len(tok)
    kv = h // shape.text_heads * shape.text_kv_heads
    sd = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": 1 + rand(h, scale=0.1), "lm_head.weight": rand(v, h)}
    for i in range(shape.text_layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(ff, h),
            p + "mlp.up_proj.weight": rand(ff, h),
            p + "mlp.down_proj.weight": rand(h, ff),
            p + "input_layernorm.weight": 1 + rand(h, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + rand(h, scale=0.1),
        }
    vh = shape.vision_hidden
    if shape.projector == "linear":
        sd |= {"model.mm_projector.weight": rand(h, vh), "model.mm_projector.bias": rand(h)}
    else:
        sd |= {
            "model.mm_projector.0.weight": rand(h, vh),
            "model.mm_projector.0.bias": rand(h),
            "model.mm_projector.2.weight": rand(h, h),
            "model.mm_projector.2.bias": rand(h),
        }

    config = text_cfg.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": vh,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad" if shape.projector != "linear" else "square",
    }
    if shape.projector != "linear":
        config["mm_projector_type"] = shape.projector
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if bin_shards:  # pytorch_model-0000N-of-00002.bin with an index, as liuhaotian's repos have
        names = sorted(sd)
        half = len(names) // 2
        index = {"metadata": {}, "weight_map": {}}
        for n, part in enumerate((names[:half], names[half:]), start=1):
            fname = f"pytorch_model-{n:05d}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, out_dir / fname)
            index["weight_map"] |= {k: fname for k in part}
        (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        save_file({k: t.contiguous() for k, t in sd.items()}, out_dir / "model.safetensors")
    return out_dir
