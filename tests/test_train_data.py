"""train.data: tokens and labels exactly as LLaVA trains on them, and samples that cannot be used named, not trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llavacli.prompts import get_template
from train import data
from train.data import IGNORE, Encoder, Rejected
from train_kit import IMAGE_TOKENS, base_models


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    llm, _ = base_models(tmp_path_factory.getbasetemp() / "train-base")
    tok = AutoTokenizer.from_pretrained(llm)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def encoder(tok, template="vicuna_v1", max_length=2048):
    return Encoder(tok, get_template(template), tok.convert_tokens_to_ids("<image>"), IMAGE_TOKENS, max_length)


MULTI_TURN = {
    "id": "m",
    "image": "x.png",
    "conversations": [
        {"from": "human", "value": "what color is the shape?\n<image>"},
        {"from": "gpt", "value": "the shape is red."},
        {"from": "human", "value": "which shape is it?"},
        {"from": "gpt", "value": "it is a circle."},
        {"from": "human", "value": "is it big?"},
        {"from": "gpt", "value": "no, it is small."},
    ],
}


# -- LLaVA's own implementation (llava/mm_utils.py tokenizer_image_token, llava/train/train.py preprocess_v1 and
# preprocess_plain), transcribed as the reference. -200 stands for the image, as there.

LLAVA_IMAGE = -200


def llava_tokenizer_image_token(prompt, tok):
    chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(LLAVA_IMAGE)
        ids.extend(chunk[offset:])
    return ids


def llava_preprocess_v1(conversation: str, tok):
    """LLaVA's labels by counting tokens per round; returns (ids, labels, whether its counts add up)."""
    input_ids = llava_tokenizer_image_token(conversation, tok)
    target = list(input_ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE] * cur
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        assert len(parts) == 2
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(rou, tok))
        instruction_len = len(llava_tokenizer_image_token(parts[0], tok)) - 2
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur : cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    return input_ids, target, cur == len(input_ids)


def _text(piece: str) -> str:
    """A SentencePiece piece as the text it stands for (ASCII here: one byte, one character)."""
    if piece.startswith("<0x") and piece.endswith(">"):
        return chr(int(piece[3:-1], 16))
    return piece.replace("▁", " ")


def labels_by_spans(rendered: str, answers: list[str], tok) -> list[int]:
    """An independent reference: a token is supervised iff the text it stands for lies inside one of the answers
    as the template wrote them; none may straddle an answer's edge. Spans come from the pieces themselves."""
    spans, pos = [], 0
    for answer in answers:
        start = rendered.index(answer, pos)
        spans.append((start, start + len(answer)))
        pos = start + len(answer)
    ids = llava_tokenizer_image_token(rendered, tok)
    labels, chunk_start, cursor = [], 0, None
    chunks = rendered.split("<image>")
    for token in ids:
        if token == tok.bos_token_id and not labels:
            labels.append(IGNORE)
            continue
        if token == LLAVA_IMAGE:
            chunk_start += len(chunks.pop(0)) + len("<image>")
            labels.append(IGNORE)
            cursor = None
            continue
        text = _text(tok.convert_ids_to_tokens(token))
        if cursor is None:  # a chunk's first piece carries SentencePiece's dummy prefix space
            cursor = chunk_start - (1 if text.startswith(" ") and not rendered[chunk_start:].startswith(" ") else 0)
        span = (cursor, cursor + len(text))
        cursor += len(text)
        inside = [s for s in spans if s[0] <= span[0] and span[1] <= s[1]]
        assert inside or not any(s[0] < span[1] and span[0] < s[1] for s in spans), f"{text!r} straddles an answer"
        labels.append(token if inside else IGNORE)
    assert cursor == len(rendered)  # every character accounted for
    return labels


def expand(ids, labels, image_id):
    out_ids, out_labels = [], []
    for i, l in zip(ids, labels):
        n = IMAGE_TOKENS if i == LLAVA_IMAGE else 1
        out_ids += [image_id if i == LLAVA_IMAGE else i] * n
        out_labels += [IGNORE if i == LLAVA_IMAGE else l] * n
    return out_ids, out_labels


def test_multi_turn_labels_are_exactly_the_answers_token_by_token(tok):
    enc = encoder(tok).encode(MULTI_TURN)
    template = get_template("vicuna_v1")
    turns, _ = data.to_turns(MULTI_TURN, template)
    rendered = template.render(turns)
    assert rendered.count("<image>") == 1 and rendered.index("<image>") < rendered.index("what color")
    # As in LLaMA's vocabulary, the system prompt's trailing space and the role are one token: an edge between
    # two unsupervised pieces that falls inside a token, which must not matter.
    assert "▁USER" in tok.convert_ids_to_tokens(enc.input_ids)

    image_id = tok.convert_tokens_to_ids("<image>")
    answers = [template.answer(t.assistant) for t in turns]
    ref_ids, ref_labels = expand(llava_tokenizer_image_token(rendered, tok), labels_by_spans(rendered, answers, tok), image_id)
    assert enc.input_ids == ref_ids  # LLaVA's tokenisation, image tokens expanded
    for position, (ours, theirs) in enumerate(zip(enc.labels, ref_labels, strict=True)):
        assert ours == theirs, f"token {position} {tok.convert_ids_to_tokens(enc.input_ids[position])!r}"

    # The supervised tokens, run by run, decode to each answer as the template writes it, </s> included.
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == [a.strip() for a in answers]
    assert [r[-1] for r in runs] == [tok.eos_token_id] * 3
    image_positions = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    assert len(image_positions) == IMAGE_TOKENS and all(enc.labels[i] == IGNORE for i in image_positions)
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE

    # LLaVA's own count-based masking miscounts this very sample ("USER" after "</s>" is not "▁USER"): it
    # would have reported a tokenization mismatch and trained on none of it.
    assert not llava_preprocess_v1(rendered, tok)[2]


def test_plain_template_supervises_only_the_caption_and_drops_the_question(tok):
    record = {"id": "p", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\ndescribe the picture"}, {"from": "gpt", "value": "a red circle"}]}
    enc = encoder(tok, "plain").encode(record)
    image_id = tok.convert_tokens_to_ids("<image>")
    caption = tok("a red circle\n", add_special_tokens=False).input_ids
    assert enc.input_ids == [tok.bos_token_id] + [image_id] * IMAGE_TOKENS + caption
    assert enc.labels == [IGNORE] * (1 + IMAGE_TOKENS) + caption
    # LLaVA's preprocess_plain: the prompt is "<image>" + caption + "\n", labels after BOS + image.
    ref = llava_tokenizer_image_token("<image>a red circle\n", tok)
    assert expand(ref, ref, image_id)[0] == enc.input_ids


def test_text_only_sample_has_no_image_tokens_and_matches_llava(tok):
    record = {"id": "t", "conversations": [{"from": "human", "value": "is a circle round?"}, {"from": "gpt", "value": "yes."}]}
    enc = encoder(tok).encode(record)
    template = get_template("vicuna_v1")
    rendered = template.render(data.to_turns(record, template)[0])
    ids, labels, counts_add_up = llava_preprocess_v1(rendered, tok)
    assert counts_add_up and (enc.input_ids, enc.labels) == (ids, labels)  # one round: LLaVA's counts hold
    assert enc.labels == labels_by_spans(rendered, [get_template("vicuna_v1").answer("yes.")], tok)
    assert enc.image is None


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"image": "x.png", "conversations": [{"from": "human", "value": "no marker"}, {"from": "gpt", "value": "a"}]}, "image count"),
        ({"conversations": [{"from": "human", "value": "<image>\nwhere is it"}, {"from": "gpt", "value": "a"}]}, "image count"),
        ({"image": "x.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}]}, "image count"),
        ({"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}, "image count"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "malformed"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "malformed"),
        ({"conversations": "hello"}, "malformed"),
    ],
)
def test_records_llava_cannot_train_on_are_rejected_with_a_reason(tok, record, reason):
    with pytest.raises(Rejected) as e:
        encoder(tok).encode(record)
    assert e.value.reason == reason


def test_a_token_straddling_an_answer_edge_is_a_tokenization_mismatch(tok):
    odd = AutoTokenizer.from_pretrained(tok.name_or_path)
    odd.add_tokens(["<image>"], special_tokens=True)
    odd.add_special_tokens({"pad_token": "<pad>"})
    odd.add_tokens([": yes"])  # one token over "ASSISTANT:" | " yes.": no label boundary can fall inside it
    record = {"id": "y", "conversations": [{"from": "human", "value": "is it red?"}, {"from": "gpt", "value": "yes."}]}
    with pytest.raises(Rejected) as e:
        encoder(odd).encode(record)
    assert e.value.reason == "tokenization mismatch"
    assert encoder(tok).encode(record).labels.count(IGNORE) < len(encoder(tok).encode(record).labels)


def test_truncation_keeps_whole_images_and_needs_an_answer_left(tok):
    enc = encoder(tok).encode(MULTI_TURN)
    first_answer_end = enc.labels.index(tok.eos_token_id) + 1
    short = encoder(tok, max_length=first_answer_end).encode(MULTI_TURN)
    assert short.truncated and short.input_ids == enc.input_ids[:first_answer_end]
    first_answer_start = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    with pytest.raises(Rejected, match="no answer tokens"):
        encoder(tok, max_length=first_answer_start).encode(MULTI_TURN)
    image_end = enc.input_ids.index(tok.convert_tokens_to_ids("<image>")) + IMAGE_TOKENS
    with pytest.raises(Rejected, match="too long"):
        encoder(tok, max_length=image_end - 1).encode(MULTI_TURN)


def test_audit_counts_and_names_every_unusable_sample(tok, tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    records = [
        MULTI_TURN | {"id": "good"},
        MULTI_TURN | {"id": "gone", "image": "missing.png"},
        {"id": "bare", "image": "x.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello."}]},
    ]
    audit = data.collect(records, data.audit(records, range(len(records)), encoder(tok), str(tmp_path)))
    assert audit.usable == [0, 3]
    assert audit.lengths[0] > 0 > audit.lengths[3]  # text-only lengths are negative, as LLaVA's modality_lengths
    assert [(sid, reason) for _, sid, reason, _ in audit.rejected] == [("gone", "missing image"), ("bare", "image count")]
    assert audit.summary().startswith("2 of 4 samples cannot be used (")
    audit.write(tmp_path / "rejected.json")
    assert [r["id"] for r in json.loads((tmp_path / "rejected.json").read_text())] == ["gone", "bare"]


def test_collator_pads_right_and_stacks_images_in_order(tok):
    pixels = data.Pixels(56, "pad", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    collate = data.Collator(tok.pad_token_id, tok.convert_tokens_to_ids("<image>"), IMAGE_TOKENS, pixels)
    a = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([IGNORE, 5, 6]), "pixel_values": torch.ones(3, 56, 56)}
    b = {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE, 7]), "pixel_values": None}
    batch = collate([b, a])
    assert batch["input_ids"].tolist() == [[1, 7, tok.pad_token_id], [1, 5, 6]]
    assert batch["labels"].tolist() == [[IGNORE, 7, IGNORE], [IGNORE, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["pixel_values"].shape == (1, 3, 56, 56) and batch["pixel_values"].eq(1).all()
    # A text-only batch carries a blank image whose tokens sit, masked and unlabelled, past the longest sample.
    blank = collate([b])
    assert blank["input_ids"][0, 2:].tolist() == [tok.convert_tokens_to_ids("<image>")] * IMAGE_TOKENS
    assert blank["attention_mask"][0, 2:].eq(0).all() and blank["labels"][0, 2:].eq(IGNORE).all()
    assert blank["pixel_values"].shape == (1, 3, 56, 56) and blank["pixel_values"].eq(0).all()


def test_pixels_are_the_runtime_preprocessing_normalised_with_clip_statistics(tmp_path):
    from PIL import Image

    from llavacli.images import preprocess

    img = Image.new("RGB", (30, 20), (200, 10, 50))
    img.save(tmp_path / "i.png")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    got = data.Pixels(28, "pad", mean, std).load(str(tmp_path / "i.png"))
    expected = torch.tensor(np.asarray(preprocess(img, 28, "pad")), dtype=torch.float32) / 255
    expected = ((expected - torch.tensor(mean)) / torch.tensor(std)).permute(2, 0, 1)
    assert got.shape == (3, 28, 28) and torch.allclose(got, expected, atol=1e-6)
    # Padded with the mean colour: the top rows normalise to about zero, the middle is the picture's red.
    assert got[:, 0].abs().max() < 0.02 and got[0, 14, 14] > 1.0
