"""The miniature's generated world: seeded, in LLaVA's formats, and every answer true of its picture."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llavacli.prompts import IMAGE, OPTION_LETTER, SHORT_ANSWER
from train.miniature import data as D
from train.miniature import vision as V

SMALL = D.Sizes(train_images=24, test_images=12, eval_per_kind=12, lm_documents=30)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "data"
    D.write_dataset(out, SMALL, seed=3)
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_dataset_other_seed_another(dataset, tmp_path):
    again = tmp_path / "again"
    D.write_dataset(again, SMALL, seed=3)
    assert _digest(again) == _digest(dataset)
    other = tmp_path / "other"
    D.write_dataset(other, SMALL, seed=4)
    assert _digest(other)["stage2.json"] != _digest(dataset)["stage2.json"]
    assert _digest(other)["images/test/00000.png"] != _digest(dataset)["images/test/00000.png"]


@pytest.mark.parametrize("name", ["stage1.json", "stage2.json", "test-stage2.json"])
def test_samples_are_llava_json_with_existing_images(dataset, name):
    samples = json.loads((dataset / name).read_text())
    assert samples
    for s in samples:
        assert set(s) == {"id", "image", "conversations"}
        assert (dataset / "images" / s["image"]).is_file()
        convs = s["conversations"]
        assert len(convs) >= 2 and len(convs) % 2 == 0
        assert [c["from"] for c in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert convs[0]["value"].startswith(IMAGE + "\n")
        assert sum(c["value"].count(IMAGE) for c in convs) == 1
        assert all(c["value"].strip() for c in convs)
    split = "test" if name.startswith("test") else "train"
    assert all(s["image"].startswith(split + "/") for s in samples)


def test_stage2_has_llava_instructs_three_kinds_and_short_answers(tmp_path):
    D.write_dataset(tmp_path, D.Sizes(train_images=120, test_images=2, eval_per_kind=1, lm_documents=1), seed=0)
    samples = json.loads((tmp_path / "stage2.json").read_text())
    kinds = Counter(s["id"].rsplit("-", 1)[1] for s in samples)
    assert set(kinds) == {"vqa", "conversation", "detail", "reasoning"}
    vqa = [s for s in samples if s["id"].endswith("-vqa")]
    questions = [c["value"] for s in vqa for c in s["conversations"][0::2]]
    assert all(q.endswith(SHORT_ANSWER) or q.endswith(OPTION_LETTER) for q in questions)


def test_eval_questions_cover_five_kinds_and_are_consistent(dataset):
    records = [json.loads(line) for line in open(dataset / "eval" / "questions.jsonl")]
    assert Counter(r["kind"] for r in records) == {k: SMALL.eval_per_kind for k in D.EVAL_KINDS}
    assert len({r["question_id"] for r in records}) == len(records)
    for r in records:
        assert (dataset / "eval" / r["image"]).resolve().is_file()
        assert "/test/" in r["image"], "evaluation uses held-out pictures only"
        if r["kind"] == D.KIND_CHOICE:
            letters = [line[0] for line in r["text"].splitlines() if len(line) > 2 and line[1:3] == ". "]
            assert letters == list("ABCD") and r["answer"] in letters and r["text"].endswith(OPTION_LETTER)
            assert len(set(r["choices"])) == 4
        else:
            assert r["text"].endswith(SHORT_ANSWER)
        if r["kind"] == D.KIND_YESNO:
            assert r["answer"] in ("yes", "no")
        if r["kind"] == D.KIND_COUNT:
            assert r["answer"] in {str(n) for n in range(D.MAX_OBJECTS + 1)}


def _scene(rng_seed: int) -> D.Scene:
    return D.make_scene(D.scene_rng(0, "t", rng_seed), f"t-{rng_seed}")


@pytest.mark.parametrize("seed", range(40))
def test_answers_are_true_of_the_scene(seed):
    scene = _scene(seed)
    rng = random.Random(seed)
    shapes = scene.shapes
    assert 1 <= len(shapes) <= D.MAX_OBJECTS
    assert len({s.cell for s in shapes}) == len(shapes), "one shape per cell"
    for _ in range(10):
        qa = D.qa_count(scene, rng)
        q = qa.question
        if q in D.Q_COUNT_ALL:
            expected = len(shapes)
        else:
            expected = next(
                (scene.count(kind=k) for k in D.SHAPES if D.PLURAL[k] in q.split()),
                None,
            )
            if expected is None:
                expected = next(scene.count(color=c) for c in D.COLORS if f" {c} " in q)
        assert qa.short == str(expected), q
        c = D.qa_color(scene, rng)
        target = [s for s in shapes if f"the {s.kind}" in c.question or D.WHERE[s.cell] in c.question]
        assert target and all(s.color == c.short for s in target), c.question
        e = D.qa_exists(scene, rng)
        color, kind = next((col, k) for col in D.COLORS for k in D.SHAPES if f" {col} {k}" in e.question)
        assert e.short == ("yes" if scene.count(color=color, kind=kind) else "no")
        m = D.qa_choice(scene, rng)
        assert m.choices[D.LETTERS.index(m.short)] in (*D.COLORS, *D.SHAPES)


@pytest.mark.parametrize("seed", range(10))
def test_questions_by_place_name_the_shape_by_its_cell(seed):
    """The probe's held-out kinds "colour by place" and "shape by place": never by kind or colour, always true."""
    scene, rng = _scene(seed), random.Random(seed)
    for _ in range(10):
        for maker, answer_of in ((D.qa_color, lambda s: s.color), (D.qa_shape, lambda s: s.kind)):
            qa = maker(scene, rng, by_place=True)
            named = [s for s in scene.shapes if qa.question.rstrip("?").removesuffix(" have").endswith(D.WHERE[s.cell])]
            assert len(named) == 1 and qa.short == answer_of(named[0]), (qa.question, scene.shapes)
            assert not any(f"the {s.kind}" in qa.question or f"the {s.color}" in qa.question for s in scene.shapes), qa.question


@pytest.mark.parametrize("seed", range(20))
def test_facts_are_true_of_the_scene(seed):
    scene = _scene(seed)
    sentences = D.facts(scene, random.Random(seed)).split(". ")
    unique_kind = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
    sampled = sum(min(2, 1 + 2 * (scene.count(kind=s.kind) == 1) + 2 * (scene.count(color=s.color) == 1)
                      + (scene.count(kind=s.kind, color=s.color) == 1)) for s in scene.shapes)
    assert len(sentences) == sampled + len(unique_kind) + 2  # + "The star red is ..." each, + two questions
    questions = [x for x in sentences if "?" in x]
    assert len(questions) == 2
    (exists, yes_no), (colour, said) = sorted((x.rstrip(".").split("? ") for x in questions), key=lambda qa: "color" in qa[0])
    color, kind = next((c, k) for c in D.COLORS for k in D.SHAPES if f" {c} {k}" in exists)
    assert yes_no == ("Yes" if scene.count(color=color, kind=kind) else "No"), questions
    target = [s for s in scene.shapes if colour.endswith((f"the {s.kind}", f"the {s.kind} have", D.WHERE[s.cell], f"{D.WHERE[s.cell]} have"))]
    assert len(target) == 1 and said == target[0].color.capitalize(), questions
    kind_first = [x for x in sentences if any(x.startswith(f"The {s.kind} {s.color} is {D.WHERE[s.cell]}") for s in unique_kind)]
    assert len(kind_first) == len(unique_kind)
    for sentence in set(sentences) - set(questions) - set(kind_first):
        sentence = sentence.rstrip(".")
        named = [s for s in scene.shapes if sentence.startswith((f"The color of the {s.kind} is", f"The {s.kind} is", f"The {s.color} shape is",
                                                                    f"The {s.color} {s.kind} is", f"The shape {D.WHERE[s.cell]} is"))]
        assert len(named) == 1, (sentence, scene.shapes)
        s = named[0]
        stated = sentence.split(" is ", 1)[1]
        assert stated in (s.color, s.size, D.WHERE[s.cell], f"{D._article(s.kind)} {s.kind}", D._noun_phrase(s)), sentence


def test_pictures_show_the_scene(tmp_path):
    """Every shape's colour is at its centre, and nothing but background far from the shapes."""
    for seed in range(10):
        scene = _scene(seed)
        img = np.asarray(D.render(scene), dtype=np.int32)
        side = img.shape[0]
        for s, jitter in zip(scene.shapes, scene.jitter):
            y, x = int(s.y * side), int(s.x * side)
            expected = np.clip(np.asarray(D.COLORS[s.color]) + np.asarray(jitter), 0, 255)
            assert np.abs(img[y, x] - expected).max() <= 3, (scene.id, s)
        owner = np.asarray(D.label_map(scene, side))
        background = img[owner == 0]
        base = np.asarray(D.BACKGROUNDS[scene.background]) + np.asarray(scene.tint)
        near_edge = 3 + scene.gradient[0]
        assert np.median(np.abs(background - base).max(axis=1)) <= near_edge


def test_stage1_captions_name_every_shape():
    rng = random.Random(0)
    for seed in range(20):
        scene = _scene(seed)
        cap = D.caption(scene, rng)
        for s in scene.shapes:
            assert s.kind in cap and s.color in cap
        assert scene.background in cap


def test_stage1_pairs_state_the_facts_only_when_asked():
    """Sizes.stage1_facts: the share of stage-1 pairs whose text is the scene's facts; at 0, the brief captions
    exactly as before (the same draws, so the shipped recipe's data is unchanged)."""
    scenes = [D.make_scene(random.Random(i), str(i)) for i in range(200)]
    plain = [D.stage1_sample(s, "x.png", random.Random(7 + i)) for i, s in enumerate(scenes)]
    zero = [D.stage1_sample(s, "x.png", random.Random(7 + i), 0.0) for i, s in enumerate(scenes)]
    assert zero == plain
    half = [D.stage1_sample(s, "x.png", random.Random(7 + i), 0.5)["conversations"][1]["value"] for i, s in enumerate(scenes)]
    stated = [i for i, text in enumerate(half) if "background" not in text]  # every brief caption names the background
    assert 60 < len(stated) < 140
    for i in stated:
        assert half[i].endswith(".") and all(s.color in half[i].lower() and s.kind in half[i] for s in scenes[i].shapes), half[i]


def test_lm_documents_use_the_vicuna_template_or_prose(dataset):
    docs = D.read_lm_documents(dataset / "lm.txt")
    assert len(docs) == SMALL.lm_documents
    chats = [d for d in docs if "ASSISTANT:" in d]
    assert chats and len(chats) < len(docs)
    assert all(d.startswith(("A chat between a curious user", "USER: ")) and d.endswith("</s>") for d in chats)
    places = D.read_lm_documents(dataset / "lm-places.txt")
    assert len(places) == SMALL.lm_place_questions and all(d.startswith("USER: ") and d.endswith("</s>") for d in places)


def test_the_language_models_first_phases_take_their_documents_in_order():
    """recipe.order_for_phases: the by-place questions, then exactly the documents built as patch words then
    facts, then everything else, untouched and in order; each phase as many documents as it drew."""
    from train.miniature.recipe import order_for_phases

    rng = random.Random(0)
    scenes = [D.make_scene(rng, str(i)) for i in range(400)]
    built = [(D.grid_text(s) + "\n" + D.facts(s, rng), True) for s in scenes[:100]]
    built += [(D.lm_document(s, rng), None) for s in scenes[100:]]
    built += [(D.grid_text(s) + " " + D.caption(s, rng) + "\n", False) for s in scenes[:50]]
    built += [(D.caption(s, rng) + " " + D.description(s), False) for s in scenes[:50]]
    documents = [doc for doc, _ in built]
    places = [D.place_question_document(s, rng) for s in scenes[:30]]
    ordered, phases = order_for_phases(documents, places, (("places", 0.25), ("facts", 0.2)), easy=0)
    n_facts = phases[1][0]
    assert phases == [(30, 0.25), (n_facts, 0.2)] and n_facts >= 100 + 0.25 * 300  # the hand-made facts, and about 7 in 20 others
    assert ordered[:30] == places and sorted(ordered[30:]) == sorted(documents)
    assert all(D.is_facts_document(d) for d in ordered[30 : 30 + n_facts])
    assert ordered[30 + n_facts :] == [d for d in documents if not D.is_facts_document(d)]
    assert all(doc in ordered[30 : 30 + n_facts] for doc, facts in built if facts)

    ordered, phases = order_for_phases(documents, places, (("easy", 0.3),), easy=120)  # the by-place questions only when named
    assert ordered == documents and phases == [(120, 0.3)]


def test_a_place_question_document_asks_by_place_and_answers_truly():
    """data.place_question_document: one vicuna_v1 turn after the patch words, with LLaVA's short-answer suffix,
    a question that names its shape by place only, and that shape's colour or kind as the answer."""
    rng = random.Random(1)
    kinds = Counter()
    for i in range(60):
        scene = D.make_scene(rng, str(i))
        doc = D.place_question_document(scene, rng)
        assert doc.startswith("USER: " + D.grid_text(scene) + "\n") and doc.endswith("</s>"), doc
        question, answer = doc[len("USER: " + D.grid_text(scene) + "\n") :].removesuffix("</s>").split(" ASSISTANT: ")
        question = question.removesuffix("\n" + SHORT_ANSWER)
        named = [s for s in scene.shapes if question.rstrip("?").removesuffix(" have").endswith(D.WHERE[s.cell])]
        assert len(named) == 1, question
        kinds[answer in D.COLORS] += 1
        assert answer == (named[0].color if answer in D.COLORS else named[0].kind), (question, answer, scene.shapes)
    assert kinds[True] > 15 and kinds[False] > 15  # colour and shape questions alike


def test_patch_words_name_each_cell_in_reading_order():
    scene = D.Scene("x", "white", [D.Shape("star", "red", "large", (0, 2), 0.83, 0.17, 0.1), D.Shape("circle", "blue", "small", (2, 0), 0.17, 0.83, 0.07)])
    words = D.grid_text(scene).split()
    assert len(words) == D.PATCHES**2
    per = D.PATCHES // D.GRID
    assert words[(per - 1) * D.PATCHES + D.PATCHES - 1] == "largeredstar"
    assert words[(D.PATCHES - 1) * D.PATCHES] == "smallbluecircle"
    assert sum(w != D.EMPTY for w in words) == 2 * per * per


def test_a_packed_document_sees_only_itself():
    """Packed into one row for pre-training, each document gives the logits it gives alone (the grids of the
    documents before it are not in its view), from position 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.miniature.language import packed_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    docs = [torch.randint(3, 64, (n,)) for n in (5, 7, 3)]
    row = torch.cat(docs + [torch.zeros(2, dtype=torch.long)])[None]
    doc = torch.tensor([[i for i, d in enumerate(docs) for _ in d] + [-1, -1]])
    mask, positions = packed_attention(doc)
    with torch.no_grad():
        packed = model(input_ids=row, attention_mask=mask, position_ids=positions).logits[0]
        start = 0
        for d in docs:
            alone = model(input_ids=d[None]).logits[0]
            assert torch.allclose(packed[start : start + len(d)], alone, atol=1e-5)
            start += len(d)
        unmasked = model(input_ids=row).logits[0]
    assert not torch.allclose(unmasked[5:12], packed[5:12], atol=1e-3), "without the mask the second document sees the first"
