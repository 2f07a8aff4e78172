"""The language model GGUF: LLaMA weights, SentencePiece vocabulary, and the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, GGUFWriter, TokenType

from convert.checkpoint import Checkpoint
from convert.writing import TensorPlan, write_gguf
from llavacli.errors import ConvertError
from llavacli.ggufmeta import TEMPLATE_KEY

# tokenizer.chat_template for other llama.cpp front ends; `llava` itself renders llavacli.prompts.
VICUNA_JINJA = (
    "{% set sys = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ sys }} "
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half Q/K rows back to the interleaved order llama.cpp's RoPE expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def vocabulary(ckpt: Checkpoint, n_rows: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types: SentencePiece pieces, then added tokens, then padding up to n_rows."""
    directory = ckpt.tokenizer_dir
    if (directory / "tokenizer.model").is_file():
        vocab = gguf.SentencePieceVocab(directory)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.sentencepiece_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        for tid, text in sorted(_added_tokens(directory).items()):
            if tid < len(tokens):
                continue
            if tid != len(tokens):
                raise ConvertError(f"{directory}: added token ids are not contiguous (gap before {tid})")
            tokens.append(text.encode())
            scores.append(-1000.0)
            types.append(TokenType.CONTROL if text.startswith("<") and text.endswith(">") else TokenType.USER_DEFINED)
    elif (directory / "tokenizer.json").is_file():
        vocab = gguf.LlamaHfVocab(directory)
        tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
    else:
        raise ConvertError(f"{directory}: no tokenizer.model or tokenizer.json")
    if len(tokens) > n_rows:
        raise ConvertError(f"tokenizer has {len(tokens)} tokens but the embedding only {n_rows} rows")
    for i in range(len(tokens), n_rows):  # llava-hf pads 32002 tokens to 32064 rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    return tokens, scores, [int(t) for t in types]


def _added_tokens(directory: Path) -> dict[int, str]:
    added: dict[int, str] = {}
    if (path := directory / "added_tokens.json").is_file():
        added |= {tid: text for text, tid in json.loads(path.read_text()).items()}
    if (path := directory / "tokenizer.json").is_file():
        added |= {t["id"]: t["content"] for t in json.loads(path.read_text()).get("added_tokens", [])}
    if (path := directory / "tokenizer_config.json").is_file():
        decoder = json.loads(path.read_text()).get("added_tokens_decoder", {})
        added |= {int(tid): t["content"] for tid, t in decoder.items()}
    return added


def plan_text_tensors(ckpt: Checkpoint, float_type: np.dtype) -> list[TensorPlan]:
    cfg = ckpt.text
    name_map = gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    plans = []
    for name in [n for n in ckpt.tensors.loaders if n.startswith(("model.", "lm_head."))]:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConvertError(f"cannot map text tensor {name!r} to GGUF")

        def load(name=name):
            t = ckpt.tensors.get(name)
            if name.endswith("q_proj.weight"):
                t = _permute(t, cfg.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                t = _permute(t, cfg.num_key_value_heads or cfg.num_attention_heads)
            return t

        plans.append(TensorPlan(gguf_name, ckpt.tensors.shape(name), load, float_type))
    return plans


def write_text_model(ckpt: Checkpoint, path: Path, float_type: np.dtype, file_type: int, progress) -> None:
    cfg = ckpt.text
    n_rows = ckpt.tensors.get("model.embed_tokens.weight").shape[0]
    tokens, scores, types = vocabulary(ckpt, n_rows)

    writer = GGUFWriter(path, gguf.MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA])
    writer.add_name(ckpt.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(ckpt.head_dim)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(ckpt.rope_theta)
    writer.add_vocab_size(n_rows)
    writer.add_file_type(file_type)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(ckpt.tokenizer_dir, load_merges=False, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(VICUNA_JINJA)
    writer.add_string(TEMPLATE_KEY, ckpt.template)

    write_gguf(writer, plan_text_tensors(ckpt, float_type), progress, "text model")
