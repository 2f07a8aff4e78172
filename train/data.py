"""LLaVA's training data: a JSON list of conversations, each with at most one image, as tokens and labels.

A record is {"id", "image": path relative to the image folder (absent for text-only samples), "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}.

Tokenisation follows LLaVA (llava/train/train.py, mm_utils.tokenizer_image_token): the template renders the
whole conversation (llavacli.prompts, the runtime's own templates), the text is split at each image, every text
chunk is tokenised on its own, and the image's place gets `image_seq_length` copies of the image token, one per
feature vector, as llava-hf's LlavaForConditionalGeneration expects. BOS comes once, first.

Labels are the tokens of the assistant's answers (each with its end marker, `</s>` for vicuna_v1) and -100
everywhere else: system prompt, questions, roles, image tokens. LLaVA derives them by counting tokens per round
and silently masks a whole sample when its counts disagree ("tokenization mismatch"); here every boundary
between a question and an answer must fall between two tokens of the real tokenisation, checked by tokenising
the text up to it. A sample where it does not, or that cannot be used for another reason, is rejected before
training starts, counted and named (see `audit`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llavacli.images import preprocess
from llavacli.prompts import IMAGE, Template, Turn
from train.config import SampleError, TrainError

IGNORE = -100  # label of a position that is not trained on
ROLES = ("human", "gpt")


class DataError(TrainError):
    """The data set cannot be trained on as it is."""


class Rejected(Exception):
    """One sample that cannot be used; `reason` is a short category for the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image: str | None  # the record's image path, relative to the image folder
    truncated: bool = False


def load_records(path: str | Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data={path}: cannot read it as JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"data={path}: expected a non-empty JSON list of samples")
    return records


def sample_id(record, index: int) -> str:
    return str(record.get("id", index)) if isinstance(record, dict) else str(index)


def to_turns(record: dict, template: Template) -> tuple[list[Turn], str | None]:
    """The record as template turns, and its image path. Raises Rejected for records LLaVA could not train on."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise Rejected("malformed", "no conversations list")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise Rejected("image count", "one image per sample (a path string)")
    messages = record["conversations"]
    if messages and isinstance(messages[0], dict) and messages[0].get("from") != "human":
        messages = messages[1:]  # LLaVA skips a conversation's leading non-human turn
    if not messages or len(messages) % 2:
        raise Rejected("malformed", "turns must be human/gpt pairs")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("from") != ROLES[i % 2] or not isinstance(m.get("value"), str):
            raise Rejected("malformed", f"turn {i} should be from {ROLES[i % 2]} with a text value")
    n_images = sum(m["value"].count(IMAGE) for m in messages)
    if any(IMAGE in m["value"] for m in messages[1::2]):
        raise Rejected("image count", "<image> inside an answer")
    if n_images != (image is not None):
        raise Rejected("image count", f"{n_images} <image> markers for {0 if image is None else 1} image")

    turns = []
    for question, answer in zip(messages[0::2], messages[1::2]):
        text, images = question["value"], question["value"].count(IMAGE)
        # LLaVA (preprocess_multimodal) moves the image to the front of its turn: "<image>\n" + the rest.
        text = text.replace(IMAGE, "").strip() if images else text
        if not template.has_roles:
            # Stage 1 (preprocess_plain): the human text is dropped, the image alone prompts the caption.
            if len(messages) != 2:
                raise Rejected("malformed", "template plain takes one question and one answer")
            text = ""
        turns.append(Turn(text, images, answer["value"]))
    return turns, image


class Encoder:
    """Tokens and labels for one record, under one template and tokenizer."""

    def __init__(self, tokenizer, template: Template, image_token_id: int, image_seq_length: int, max_length: int):
        self.tok = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.max_length = max_length
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id in tokenizer("a").input_ids[:1] else []
        if "</s>" in template.end_of_answer and self._ids("</s>") != [tokenizer.eos_token_id]:
            raise DataError(f"template {template.name} ends answers with </s>, which this tokenizer does not read as its EOS")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def pieces(self, turns: list[Turn]) -> list[tuple[str, bool]]:
        """The rendered conversation as alternating (text, supervised) pieces: the edges between them are the
        only places where labels switch on or off, so the only ones that must fall between tokens (the system
        prompt's trailing space, say, may well join "USER" in one token)."""
        rendered = [(self.template.opening(), False)]
        for turn in turns:
            rendered.append((self.template.question(turn.user, turn.images), False))
            rendered.append((self.template.answer(turn.assistant), True))
        assert "".join(t for t, _ in rendered) == self.template.render(turns)
        out: list[tuple[str, bool]] = []
        for text, supervised in rendered:
            if out and out[-1][1] == supervised:
                out[-1] = (out[-1][0] + text, supervised)
            elif text:
                out.append((text, supervised))
        return out

    def _chunk(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """One text chunk (no image inside) tokenised whole; each piece boundary must fall between tokens."""
        text = "".join(t for t, _ in pieces)
        ends = np.cumsum([len(t) for t, _ in pieces]).tolist()
        encoded = self.tok([text] + [text[:end] for end in ends[:-1]], add_special_tokens=False).input_ids
        ids, prefixes = encoded[0], encoded[1:]
        labels, start = [], 0
        for (_, supervised), prefix, end in zip(pieces, prefixes + [ids], ends):
            if ids[: len(prefix)] != prefix:
                around = f"{text[max(0, end - 20) : end]!r} | {text[end : end + 20]!r}"
                raise Rejected("tokenization mismatch", f"a token straddles the answer's edge at {around}")
            labels += ids[start : len(prefix)] if supervised else [IGNORE] * (len(prefix) - start)
            start = len(prefix)
        return ids, labels

    def encode(self, record: dict) -> Encoded:
        turns, image = to_turns(record, self.template)
        # Split the pieces at each image: LLaVA tokenises the text between images chunk by chunk.
        chunks: list[list[tuple[str, bool]]] = [[]]
        for text, supervised in self.pieces(turns):
            parts = text.split(IMAGE)
            for k, part in enumerate(parts):
                if k:
                    chunks.append([])
                if part:
                    chunks[-1].append((part, supervised))
        input_ids, labels = list(self.bos), [IGNORE] * len(self.bos)
        for k, chunk in enumerate(chunks):
            if k:
                input_ids += [self.image_token_id] * self.image_seq_length
                labels += [IGNORE] * self.image_seq_length
            if chunk:
                ids, lab = self._chunk(chunk)
                input_ids += ids
                labels += lab
        truncated = len(input_ids) > self.max_length
        if truncated:
            if image is not None and input_ids.index(self.image_token_id) + self.image_seq_length > self.max_length:
                raise Rejected("too long", f"the image's tokens end beyond max_length={self.max_length}")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(x == IGNORE for x in labels):
            raise Rejected("no answer tokens", f"nothing to learn within max_length={self.max_length}")
        return Encoded(input_ids, labels, image, truncated)


@dataclass
class Audit:
    """The outcome of checking every sample before training: what is usable, and why the rest is not."""

    n_records: int
    lengths: dict[int, int]  # usable index -> tokens (negative for text-only samples, as LLaVA's modality_lengths)
    rejected: list[tuple[int, str, str, str]]  # (index, id, reason, detail)
    truncated: int

    @property
    def usable(self) -> list[int]:
        return sorted(self.lengths)

    def summary(self) -> str:
        counts = Counter(reason for _, _, reason, _ in self.rejected)
        ids = ", ".join(sid for _, sid, _, _ in self.rejected[:5]) + (" ..." if len(self.rejected) > 5 else "")
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        return f"{len(self.rejected)} of {self.n_records} samples cannot be used ({by_reason}; ids {ids})"

    def write(self, path: Path) -> None:
        rows = [{"index": i, "id": sid, "reason": r, "detail": d} for i, sid, r, d in self.rejected]
        path.write_text(json.dumps(rows, indent=1) + "\n")


def audit(records: list[dict], indices, encoder: Encoder, image_folder: str) -> list[tuple]:
    """Encode the text of the given records and look for their image files; no pixels are read.

    Returns (index, length or None, reason, detail, truncated) rows, for `Audit` to collect across processes.
    """
    rows = []
    for i in indices:
        record = records[i]
        try:
            enc = encoder.encode(record)
            if enc.image is not None and not os.path.isfile(os.path.join(image_folder, enc.image)):
                raise Rejected("missing image", enc.image)
        except Rejected as e:
            rows.append((i, None, e.reason, str(e), False))
            continue
        n = len(enc.input_ids)
        rows.append((i, n if enc.image is not None else -n, "", "", enc.truncated))
    return rows


def collect(records: list[dict], rows: list[tuple]) -> Audit:
    lengths, rejected, truncated = {}, [], 0
    for i, length, reason, detail, was_truncated in sorted(rows):
        if length is None:
            rejected.append((i, sample_id(records[i], i), reason, detail))
        else:
            lengths[i] = length
            truncated += was_truncated
    return Audit(len(records), lengths, rejected, truncated)


@dataclass(frozen=True)
class Pixels:
    """How an image becomes the tower's input: llavacli.images decides the pixels, CLIP's mean/std the scale."""

    size: int
    mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def load(self, path: str) -> torch.Tensor:
        with Image.open(path) as img:
            img = preprocess(img, self.size, self.mode)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def blank(self) -> torch.Tensor:
        """The mean colour, normalised: LLaVA's stand-in image for text-only batches."""
        return torch.zeros(3, self.size, self.size)


class LlavaDataset(torch.utils.data.Dataset):
    """Index -> {"input_ids", "labels", "pixel_values" (or None)}; tokenised lazily, like LLaVA's lazy_preprocess."""

    def __init__(self, records: list[dict], encoder: Encoder, image_folder: str, pixels: Pixels):
        self.records, self.encoder, self.image_folder, self.pixels = records, encoder, image_folder, pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        enc = self.encoder.encode(self.records[i])
        pixel_values = None
        if enc.image is not None:
            path = os.path.join(self.image_folder, enc.image)
            try:
                pixel_values = self.pixels.load(path)
            except (OSError, ValueError) as e:  # found by the audit, but unreadable
                raise SampleError(f"sample {sample_id(self.records[i], i)}: cannot read {path} ({e})") from None
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }


@dataclass
class Collator:
    """Right-pads a micro-batch; stacks its images in the order their tokens appear.

    A micro-batch without any image still runs the vision tower and projector, on a blank image whose tokens sit
    in the padding (attention mask 0, labels -100): their output reaches no loss, so the loss and the gradients
    are unchanged, but every process runs the same modules in the same order every step, which DDP (no unused
    parameters), DeepSpeed ZeRO-3 and FSDP (collective gathers per module) need. LLaVA feeds zero images for the
    same reason.
    """

    pad_token_id: int
    image_token_id: int
    image_seq_length: int
    pixels: Pixels

    def __call__(self, samples: list[dict]) -> dict:
        images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        extra = 0 if images else self.image_seq_length
        length = max(len(s["input_ids"]) for s in samples) + extra
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = s["input_ids"], s["labels"], 1
        if not images:
            input_ids[0, length - extra :] = self.image_token_id
            images = [self.pixels.blank()]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack(images),
        }
