"""Several images in one `llava ask`: answers decoded together as llama.cpp sequences equal the ones
answered one image at a time, token for token at temperature 0, in the images' order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_llava

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "examples" / f"shapes-{i}.png" for i in (1, 2, 3)]
PROMPT = "What shape is in the picture?"


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints.gguf("hf15", "f32")


def _answers(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_answers_together_equal_answers_one_at_a_time(pair, images):
    paths = [images["square"], images["wide"], images["tall"], images["square"]]
    args = ("ask", *paths, PROMPT, "-m", pair[0], "-n", "24", "--json", "--no-cache")
    alone = _answers(run_llava(*args, "--parallel", "1"))
    together = _answers(run_llava(*args, "--parallel", "4"))
    auto = _answers(run_llava(*args))
    assert [a["image"] for a in together] == [str(p) for p in paths]
    assert [a["answer"] for a in together] == [a["answer"] for a in alone] == [a["answer"] for a in auto]
    assert [a["tokens"] for a in together] == [a["tokens"] for a in alone] == [24] * 4
    assert together[0]["answer"] == together[3]["answer"] != together[1]["answer"]


def test_answers_that_end_at_different_steps_stream_in_order():
    """The demo model describes 3, 4 and 5 shapes: three lengths, each ended by the model itself."""
    args = ("ask", *EXAMPLES, "Describe the image in detail.", "--model", "demo", "--no-cache")
    alone = run_llava(*args, "--parallel", "1")
    together = run_llava(*args, "--parallel", "3")
    assert alone.returncode == together.returncode == 0, together.stderr
    assert together.stdout == alone.stdout
    lines = together.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(p) for p in EXAMPLES]
    assert len({len(line) for line in lines}) == 3
    tokens = [a["tokens"] for a in _answers(run_llava(*args, "--parallel", "3", "--json"))]
    assert len(set(tokens)) == 3 and max(tokens) < 512


def test_more_images_than_sequences_go_in_groups(pair, images):
    paths = [images["wide"], images["square"], images["tall"], images["wide"], images["tall"]]
    args = ("ask", *paths, PROMPT, "-m", pair[0], "-n", "12", "--no-cache")
    alone, grouped = run_llava(*args, "--parallel", "1"), run_llava(*args, "--parallel", "2")
    assert alone.returncode == grouped.returncode == 0, grouped.stderr
    assert grouped.stdout == alone.stdout
    assert len(grouped.stdout.splitlines()) == 5


def test_a_context_too_small_for_two_answers_falls_back_to_one_at_a_time(pair, images):
    """auto keeps to the KV cache --ctx-size asks for: 2 x (prompt + 400 tokens) does not fit in 1024."""
    paths = [images["square"], images["wide"]]
    args = ("ask", *paths, PROMPT, "-m", pair[0], "-n", "400", "-c", "1024", "--json", "--no-cache")
    auto, alone = _answers(run_llava(*args)), _answers(run_llava(*args, "--parallel", "1"))
    assert [a["answer"] for a in auto] == [a["answer"] for a in alone]


def test_prompt_states_serve_any_number_of_answers_together(pair, images, tmp_path):
    """A batch keeps one KV stream per answer, and llama.cpp loads a state only into a cache of as many
    streams as it was saved from; the engine saves every state in one form. States written by 2 answers
    together serve them one at a time and in a batch of 3, with the same answers as without the cache."""
    env = {"LLAVA_CACHE": str(tmp_path / "cache")}
    two, three = [images["square"], images["tall"]], [images["square"], images["tall"], images["wide"]]

    def ask(paths, *options):
        proc = run_llava("ask", *paths, PROMPT, "-m", pair[0], "-n", "16", "--json", "-v", *options, env=env)
        return _answers(proc), proc.stderr.count("decoding image batch")

    cold, evaluated = ask(two)  # together, writing the cache
    assert evaluated == 2
    alone, evaluated = ask(two, "--parallel", "1")
    assert evaluated == 0, "a state saved by 2 answers together did not load into one conversation"
    together, evaluated = ask(three, "--parallel", "3")
    assert evaluated == 1, "states saved by 2 answers together did not load into a batch of 3"
    reference = _answers(run_llava("ask", *three, PROMPT, "-m", pair[0], "-n", "16", "--json", "--no-cache", "--parallel", "1"))
    assert [a["answer"] for a in cold] == [a["answer"] for a in alone] == [a["answer"] for a in reference[:2]]
    assert [a["answer"] for a in together] == [a["answer"] for a in reference]
    info = run_llava("cache", "info", env=env)
    assert "3 image embeddings, 3 prompt states" in info.stdout


def test_a_bad_image_in_a_group_is_reported_and_the_rest_answered_together(pair, images, tmp_path):
    missing = tmp_path / "missing.png"
    proc = run_llava("ask", images["square"], missing, images["wide"], PROMPT, "-m", pair[0], "-n", "8",
                     "--parallel", "3")
    assert proc.returncode == 1
    assert [line.split(": ", 1)[0] for line in proc.stdout.splitlines()] == [str(images["square"]), str(images["wide"])]
    assert proc.stderr.strip() == f"llava: error: image {missing}: no such file"


def test_parallel_must_be_a_positive_number(pair, images):
    proc = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "--parallel", "0")
    assert proc.returncode == 2 and "--parallel" in proc.stderr
