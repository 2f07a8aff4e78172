"""The miniature's language model: its own SentencePiece tokenizer and a small LLaMA, pre-trained on the
generated text.

The tokenizer follows LLaMA's conventions (BPE, unk 0, bos 1, eos 2, byte fallback, digits split, identity
normalisation, a dummy prefix space), so llama.cpp's SentencePiece tokenizer and transformers' agree on it. Like
llava-hf, `<image>` and `<pad>` are added after the SentencePiece pieces and the embedding rows are padded to a
multiple of 64.

The text is what the generator says about scenes (train.miniature.data.lm_document): captions and detailed
descriptions, and vicuna_v1 conversations in which the description stands where the picture will later be, so
the model has learnt the language, the template and how to answer from its context before it sees an image.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llavacli.prompts import IMAGE
from train.miniature import data as D

PAD = "<pad>"


@dataclass(frozen=True)
class LMShape:
    vocab: int = 1024  # SentencePiece pieces (bytes and specials included)
    hidden: int = 192
    ff: int = 512
    layers: int = 4
    heads: int = 3
    kv_heads: int = 3
    max_positions: int = 1024


def train_tokenizer(out_dir: Path, documents: list[str], vocab: int, seed: int = 0) -> Path:
    """A LLaMA-style SentencePiece BPE model trained on the documents' lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for doc in documents for line in doc.replace("</s>", "\n").split("\n") if line.strip()]
    random.Random(seed).shuffle(lines)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=24,  # the patch words (grid_text) are one piece each, "▁smallyellowtriangle" included
        input_sentence_size=200000,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    return out_dir / "tokenizer.model"


def hf_tokenizer(directory: Path):
    """transformers' tokenizer for the SentencePiece model (BOS first, as LLaMA's), with `<image>` and `<pad>`
    added as llava-hf has them."""
    tok = AutoTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=False)
    tok.add_tokens([IMAGE], special_tokens=True)
    tok.add_special_tokens({"pad_token": PAD})
    return tok


def lm_config(shape: LMShape, tok) -> LlamaConfig:
    rows = (len(tok) + 63) // 64 * 64
    return LlamaConfig(
        vocab_size=rows,
        hidden_size=shape.hidden,
        intermediate_size=shape.ff,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


@dataclass(frozen=True)
class LMTraining:
    steps: int = 300
    batch: int = 16
    seq: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.05


def pack(tok, documents: list[str], seq: int) -> torch.Tensor:
    """The documents (bos ... eos each) packed whole into rows of `seq` tokens, padded at the end of a row.

    A document is never cut across rows: its questions are about its own grid, which must be in view."""
    rows: list[list[int]] = [[]]
    for doc in documents:
        ids = tok(doc, add_special_tokens=True)["input_ids"]
        if ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        ids = ids[:seq]
        if len(rows[-1]) + len(ids) > seq:
            rows.append([])
        rows[-1].extend(ids)
    pad = tok.pad_token_id
    return torch.tensor([r + [pad] * (seq - len(r)) for r in rows if r], dtype=torch.long)


def patch_word_parts(tok) -> dict[int, list[int]]:
    """Token id of each patch word ("▁largeredstar") -> the token ids of its parts ("▁large", "▁red", "▁star")."""
    from train.miniature import data as D

    parts = {}
    for kind in D.SHAPES:
        for color in D.COLORS:
            for size in D.SIZES:
                word = tok(D.patch_word(D.Shape(kind, color, size, (0, 0), 0, 0, 0)), add_special_tokens=False).input_ids
                pieces = [tok(w, add_special_tokens=False).input_ids for w in (size, color, kind)]
                if len(word) != 1 or any(len(p) != 1 for p in pieces):
                    raise RuntimeError(f"patch word {word} or its parts are not single tokens; retrain the tokenizer")
                parts[word[0]] = [p[0] for p in pieces]
    return parts


class ComposedEmbedding:
    """Patch words embedded as the sum of their parts' embeddings (e(largeredstar) = e(large) + e(red) + e(star)),
    so "star" in a question and "largeredstar" in the grid share a direction from the first step. Only during
    pre-training; the saved model has the sums written into its embedding matrix, an ordinary LLaMA."""

    def __init__(self, model, parts: dict[int, list[int]]):
        self.embed = model.get_input_embeddings()
        self.words = torch.tensor(sorted(parts))
        self.parts = torch.tensor([parts[w] for w in sorted(parts)])

    def matrix(self) -> torch.Tensor:
        w = self.embed.weight
        return w.index_copy(0, self.words, w[self.parts].sum(1))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.matrix())

    @torch.no_grad()
    def bake(self) -> None:
        self.embed.weight.copy_(self.matrix())


def grid_mask(ids: torch.Tensor, words: torch.Tensor, empty: int, pad: int | None = None) -> torch.Tensor:
    """True where a token is a patch word (input, like an image's tokens, never a prediction target) or padding."""
    return torch.isin(ids, torch.cat([words, torch.tensor([empty] + ([pad] if pad is not None else []))]))


def cosine_lr(step: int, total: int, base: float, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w))))


def pretrain_lm(
    out_dir: Path,
    documents: list[str],
    heldout: list[str],
    shape: LMShape = LMShape(),
    cfg: LMTraining = LMTraining(),
    seed: int = 0,
    log=print,
) -> dict:
    """Tokenizer, then a LlamaForCausalLM trained on the packed documents; both saved to out_dir."""
    start = time.time()
    train_tokenizer(out_dir, documents, shape.vocab, seed)
    tok = hf_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(lm_config(shape, tok))
    composed = ComposedEmbedding(model, patch_word_parts(tok))
    empty = tok(D.EMPTY, add_special_tokens=False).input_ids[0]
    rows = pack(tok, documents, cfg.seq)
    held = pack(tok, heldout, cfg.seq)
    log(f"language model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {rows.numel()} training tokens")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98)
    )

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        labels = batch.masked_fill(grid_mask(batch, composed.words, empty, tok.pad_token_id), -100)
        return model(inputs_embeds=composed(batch), labels=labels).loss

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen)
    curve = []
    model.train()
    for step in range(cfg.steps):
        lo = (step * cfg.batch) % len(rows)
        if lo + cfg.batch > len(rows):
            order = torch.randperm(len(rows), generator=gen)
            lo = 0
        batch = rows[order[lo : lo + cfg.batch]]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            log(f"language step {step + 1}/{cfg.steps} loss {sum(curve[-25:]) / len(curve[-25:]):.4f} ({time.time() - start:.0f}s)")
    composed.bake()
    model.eval()
    with torch.no_grad():
        held_loss = float(sum(loss_of(held[i : i + 16]) for i in range(0, len(held), 16)) / max(1, math.ceil(len(held) / 16)))
    log(f"language held-out loss {held_loss:.4f}")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"loss": curve, "heldout_loss": held_loss, "seconds": time.time() - start}
