"""The miniature's language model: its own SentencePiece tokenizer and a small LLaMA, pre-trained on the
generated text.

The tokenizer follows LLaMA's conventions (BPE, unk 0, bos 1, eos 2, byte fallback, digits split, identity
normalisation, a dummy prefix space), so llama.cpp's SentencePiece tokenizer and transformers' agree on it. Like
llava-hf, `<image>` and `<pad>` are added after the SentencePiece pieces and the embedding rows are padded to a
multiple of 64.

The text is what the generator says about scenes (train.miniature.data.lm_document): captions and detailed
descriptions, facts that look one shape up, and vicuna_v1 conversations, the last two with the scene's patch
words where the picture will later be, so the model has learnt the language, the template and how to answer
from its context before it sees an image. Documents are packed into rows, each in a view of its own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
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
    layers: int = 3
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
    steps: int = 900
    batch: int = 32
    seq: int = 192
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: float = 0.03


def pack(tok, documents: list[str], seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documents (bos ... eos each) packed whole into rows of `seq` tokens, padded at the end of a row; for
    each token whether it belongs to a conversation (vicuna_v1 layout) rather than prose, and which document of
    its row it is (-1: padding).

    A document is never cut across rows (its questions are about its own grid, which must be in view), and
    `packed_attention` keeps it from seeing the other documents of its row (their grids are distractors)."""
    rows: list[list[int]] = [[]]
    chats: list[list[bool]] = [[]]
    docs: list[list[int]] = [[]]
    for doc in documents:
        ids = tok(doc, add_special_tokens=True)["input_ids"]
        if ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        ids = ids[:seq]
        if len(rows[-1]) + len(ids) > seq:
            rows.append([])
            chats.append([])
            docs.append([])
        docs[-1].extend([docs[-1][-1] + 1 if docs[-1] else 0] * len(ids))
        rows[-1].extend(ids)
        chats[-1].extend([CHAT_MARK in doc] * len(ids))
    pad = tok.pad_token_id
    keep = [i for i, r in enumerate(rows) if r]
    ids = torch.tensor([rows[i] + [pad] * (seq - len(rows[i])) for i in keep], dtype=torch.long)
    chat = torch.tensor([chats[i] + [False] * (seq - len(chats[i])) for i in keep], dtype=torch.bool)
    doc = torch.tensor([docs[i] + [-1] * (seq - len(docs[i])) for i in keep], dtype=torch.long)
    return ids, chat, doc


def packed_attention(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask (batch, 1, seq, seq) and position ids that make each packed document its own sequence,
    starting at position 0 as a prompt does at inference."""
    n = doc.shape[1]
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    starts = torch.cat([torch.ones_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], 1)
    index = torch.arange(n).expand_as(doc)
    first = torch.where(starts, index, 0).cummax(1).values
    return mask[:, None], index - first


CHAT_MARK = "ASSISTANT:"


def answer_mask(ids: torch.Tensor, assistant: int, eos: int) -> torch.Tensor:
    """True on the assistant's answers: from after "ASSISTANT:" up to and including the "</s>" that ends them."""
    starts = (ids == assistant).long()
    ends = (ids == eos).long()
    open_ = (starts.cumsum(1) - torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1).cumsum(1)) > 0
    prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)
    return open_ & (ids != assistant) & (prev != assistant)


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
    """How a scene given as patch words (data.grid_text) enters the language model in pre-training.

    The k-th patch word of a grid, say "largeredstar" in the top left cell, enters as

        e(large) + e(red) + e(star) + e(top) + e(left)      what is in this cell, and where

    (an empty cell: e(empty) + its place's words), in the directions of the words a question uses ("the
    star", "the top left corner"), so a question finds its shape by attending to the patch that shares
    them. The vision tower's patch features carry the same (vision.py), and the projector learns to map them
    onto these sums in stage 1. Pre-training only: the saved model is an ordinary LLaMA, and patch words never
    reach it again.

    (An earlier recipe also added the sum of the whole scene's words to every patch, so a question could read
    its answer off any patch. The model then learnt which colours and kinds a picture holds but not which
    goes with which: with two shapes, "what colour is the star?" got either colour.)
    """

    def __init__(self, model, parts: dict[int, list[int]], empty: int, place_words: list[list[int]]):
        self.embed = model.get_input_embeddings()
        self.words = torch.tensor(sorted(parts))
        self.parts = torch.tensor([parts[w] for w in sorted(parts)])
        self.grid_ids = torch.cat([self.words, torch.tensor([empty])])
        self.place_words = place_words  # per patch (row-major), the token ids of its cell's place words

    def local(self) -> torch.Tensor:
        """The embedding matrix with each patch word's row replaced by the sum of its parts."""
        w = self.embed.weight
        return w.index_copy(0, self.words, w[self.parts].sum(1))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight
        out = nn.functional.embedding(input_ids, self.local())
        is_grid = torch.isin(input_ids, self.grid_ids)
        if not bool(is_grid.any()):
            return out
        k = (is_grid.long().cumsum(1) - 1) % len(self.place_words)  # grids are whole runs of n tokens
        places = torch.stack([w[ids].sum(0) if ids else w.new_zeros(w.shape[1]) for ids in self.place_words])  # (n, H)
        return out + places[k] * is_grid.unsqueeze(-1)


def place_word_ids(tok) -> list[list[int]]:
    """For each patch, row-major, the token ids of the place words of its cell ("top", "left"; "center")."""
    per = D.PATCHES // D.GRID
    out = []
    for k in range(D.PATCHES * D.PATCHES):
        cell = (k // D.PATCHES // per, k % D.PATCHES // per)
        ids = [tok(w, add_special_tokens=False).input_ids for w in D.POSITION[cell].split()]
        if any(len(i) != 1 for i in ids):
            raise RuntimeError(f"place words of {cell} are not single tokens")
        out.append([i[0] for i in ids])
    return out


def composed_embedding(model, tok) -> ComposedEmbedding:
    empty = tok(D.EMPTY, add_special_tokens=False).input_ids
    assert len(empty) == 1
    return ComposedEmbedding(model, patch_word_parts(tok), empty[0], place_word_ids(tok))


def input_only(ids: torch.Tensor, composed: ComposedEmbedding, pad: int) -> torch.Tensor:
    """True where a token is a patch word (input, like an image's tokens, never a prediction target) or padding."""
    return torch.isin(ids, torch.cat([composed.grid_ids, torch.tensor([pad])]))


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
    phases: Sequence[tuple[int, float]] = (),
    late: tuple[list[str], float, float] | None = None,
    log=print,
) -> dict:
    """Tokenizer, then a LlamaForCausalLM trained on the packed documents; both saved to out_dir.

    Conversations are supervised on the assistant's answers only, as stage 2 will be (their questions are
    random draws, not worth modelling); prose on every token; patch words never. `phases` are first phases,
    each (how many documents, share of the steps): the first draws every batch from the first n documents
    alone, the next from the n after them, and so on; after them every batch draws on all the documents. The
    recipe puts there the documents about one- and two-shape scenes (a lookup among few shapes is found
    first, then carried over to crowded scenes), or what `--lm-phases` names (recipe.Recipe.lm_phases).
    `late` is (documents, from, share): from that share of the steps on, that share of every batch is drawn
    from these documents alone (`--lm-late-places`).
    """
    start = time.time()
    train_tokenizer(out_dir, documents, shape.vocab, seed)
    tok = hf_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(lm_config(shape, tok))
    composed = composed_embedding(model, tok)
    assistant = tok("ASSISTANT", add_special_tokens=False).input_ids
    assert len(assistant) == 1, "the tokenizer must read ASSISTANT as one token"
    if any(n <= 0 for n, _ in phases):
        raise ValueError(f"every first phase needs documents: {phases}")
    bounds = [0]
    for n, _ in phases:
        bounds.append(bounds[-1] + n)
    groups = [pack(tok, documents[a:b], cfg.seq) for a, b in zip(bounds, bounds[1:] + [len(documents)])]
    rows, chat, doc = (torch.cat([g[i] for g in groups]) for i in range(3))
    pools, row, step_end = [], 0, 0.0  # (last step, first row, end row) of each first phase
    for (_, share), group in zip(phases, groups):
        step_end += share * cfg.steps
        pools.append((step_end, row, row + len(group[0])))
        row += len(group[0])
    late_rows = pack(tok, late[0], cfg.seq) if late else None
    late_from, late_count = (int(late[1] * cfg.steps), round(late[2] * cfg.batch)) if late else (cfg.steps, 0)
    held, held_chat, held_doc = pack(tok, heldout, cfg.seq)
    log(f"language model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(rows)} rows of {cfg.seq} tokens")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98)
    )

    def loss_of(batch: torch.Tensor, is_chat: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        supervised = torch.where(is_chat, answer_mask(batch, assistant[0], tok.eos_token_id), True)
        supervised &= ~input_only(batch, composed, tok.pad_token_id)
        mask, positions = packed_attention(doc)
        labels = batch.masked_fill(~supervised, -100)
        return model(inputs_embeds=composed(batch), attention_mask=mask, position_ids=positions, labels=labels).loss

    gen = torch.Generator().manual_seed(seed)
    curve = []
    model.train()
    for step in range(cfg.steps):
        lo, hi = next(((a, b) for end, a, b in pools if step < end), (0, len(rows)))
        mixed = late_count if step >= late_from else 0
        idx = torch.randint(lo, hi, (cfg.batch - mixed,), generator=gen)
        batch = [rows[idx], chat[idx], doc[idx]]
        if mixed:
            late_idx = torch.randint(0, len(late_rows[0]), (mixed,), generator=gen)
            batch = [torch.cat([b, extra[late_idx]]) for b, extra in zip(batch, late_rows)]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        loss = loss_of(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            log(f"language step {step + 1}/{cfg.steps} loss {sum(curve[-25:]) / len(curve[-25:]):.4f} ({time.time() - start:.0f}s)")
    model.eval()
    with torch.no_grad():
        parts = [loss_of(held[i : i + 16], held_chat[i : i + 16], held_doc[i : i + 16]) for i in range(0, len(held), 16)]
        held_loss = float(sum(parts) / max(1, len(parts)))
    log(f"language held-out loss {held_loss:.4f}")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    mixed_in = {"documents": len(late[0]), "from_step": late_from, "rows_per_batch": late_count} if late else None
    return {"loss": curve, "heldout_loss": held_loss, "seconds": time.time() - start, "late": mixed_in}


@torch.no_grad()
def grid_qa_accuracy(model_dir: Path, per_kind: int = 40, seed: int = 0) -> dict[str, float]:
    """The pre-trained language model answering held-out evaluation questions about scenes given as patch words
    (text only, no picture): how much of the task it can already do before it sees an image."""
    from llavacli import evaluate
    from llavacli.prompts import Turn, get_template

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    composed = composed_embedding(model, tok)
    rng = random.Random(f"miniature/{seed}/lm-eval")
    template = get_template("vicuna_v1")
    records, predictions = [], []
    for kind in D.EVAL_KINDS:
        for j in range(per_kind):
            scene = D.make_scene(D.scene_rng(seed, "lm-eval", len(records)), "x")
            r = D.eval_question(scene, "", rng, kind, str(j))
            ids = torch.tensor([tok(template.render([Turn(D.grid_text(scene) + "\n" + r["text"], 0)])).input_ids])
            answer = []
            for _ in range(6):  # greedy, with the patch words composed as in training
                token = int(model(inputs_embeds=composed(ids)).logits[0, -1].argmax())
                if token == tok.eos_token_id:
                    break
                answer.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
            records.append(r)
            predictions.append(tok.decode(answer, skip_special_tokens=True).strip())
    return {k: v["accuracy"] for k, v in evaluate.summarize(records, predictions)["kinds"].items()}
