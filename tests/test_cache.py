"""The cache of image work: a second question about an image skips the vision encoder and the prefix.

Driven through the installed `llava` command with its own LLAVA_CACHE per test, plus the Cache class
directly for eviction and damaged entries.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import LLAVA, run_llava
from llavacli.cache import Cache, parse_size

PROMPT = "What shape is in the picture?"
SAMPLED = ("--temperature", "1.5", "--top-p", "1", "--seed", "7")  # every logit matters to these answers


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints.gguf("hf15", "f32")


def ask(pair, cache_dir, *args, n=16):
    proc = run_llava("ask", *args, "-m", pair[0], "-n", str(n), "-c", "1024", env={"LLAVA_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    return proc


def entries(cache_dir) -> list:
    return sorted((cache_dir / "entries").glob("*/*.*[a-z]"))


def test_second_question_skips_the_vision_encoder_and_the_prefix(pair, images, tmp_path):
    first = ask(pair, tmp_path, images["wide"], PROMPT, "--json", "-v")
    assert "clip_model_loader" in first.stderr
    assert "clip_encode" in first.stderr and "decoding image batch" in first.stderr
    assert sorted(p.suffix for p in entries(tmp_path)) == [".emb", ".state"]

    second = ask(pair, tmp_path, images["wide"], "Another question?", "--json", "-v")
    assert "clip_model_loader" not in second.stderr, "the vision model was loaded, though nothing needed it"
    assert "vocab only" in first.stderr and "vocab only" not in second.stderr  # Engine's vision_first
    assert "clip_encode" not in second.stderr, "the vision encoder ran again"
    assert "decoding image batch" not in second.stderr, "the image was evaluated again"
    assert len(entries(tmp_path)) == 2

    info = run_llava("cache", "info", env={"LLAVA_CACHE": str(tmp_path)})
    assert info.returncode == 0 and "1 image embeddings, 1 prompt states" in info.stdout


def test_a_cached_answer_equals_an_uncached_one_token_for_token(pair, images, tmp_path):
    ask(pair, tmp_path / "c", images["tall"], PROMPT, n=1)  # a miss: computes and stores
    for options in ((), SAMPLED):  # greedy, as asked; sampled, where every logit shows
        args = (images["tall"], PROMPT, "--json", *options)
        cached = ask(pair, tmp_path / "c", *args, n=24)
        uncached = ask(pair, tmp_path / "none", *args, "--no-cache", n=24)
        answers = [{k: v for k, v in json.loads(p.stdout).items() if k != "seconds"} for p in (cached, uncached)]
        assert answers[0] == answers[1]
    assert not (tmp_path / "none" / "entries").exists(), "--no-cache wrote to the cache"


def test_the_prompt_state_is_kept_apart_per_flash_attention_setting(pair, images, tmp_path):
    """llama.cpp lays the V cache out differently with flash attention, so each setting has its own state;
    the image embeddings (the vision encoder's work) serve both."""
    ask(pair, tmp_path, images["wide"], PROMPT, "--flash-attn", "on", n=1)
    other = ask(pair, tmp_path, images["wide"], PROMPT, "--flash-attn", "off", "--json", "-v", n=24)
    assert "clip_encode" not in other.stderr, "the embeddings were not reused"
    assert "decoding image batch" in other.stderr, "a state saved with flash attention on was used with it off"
    assert sorted(p.suffix for p in entries(tmp_path)) == [".emb", ".state", ".state"]
    uncached = ask(pair, tmp_path / "none", images["wide"], PROMPT, "--flash-attn", "off", "--json", "--no-cache", n=24)
    answers = [{k: v for k, v in json.loads(p.stdout).items() if k != "seconds"} for p in (other, uncached)]
    assert answers[0] == answers[1]


def test_the_prompt_state_is_kept_apart_per_weight_layout(pair, images, tmp_path):
    """Several images load the LLM's weights without llama.cpp's repacking (llavacli.batch), one image with
    it; the two round differently, so each has its own state, and the image embeddings serve both."""
    ask(pair, tmp_path, images["wide"], PROMPT, n=1)  # one image: repacked
    both = ask(pair, tmp_path, images["wide"], images["tall"], PROMPT, "--json", "-v", n=4)
    assert both.stderr.count("clip_encode: output embedding") == 1, "the embeddings of the image asked about alone were not reused"
    assert both.stderr.count("decoding image batch") == 2, "a state saved with repacked weights was used with plain ones"
    assert sorted(p.suffix for p in entries(tmp_path)) == [".emb", ".emb", ".state", ".state", ".state"]


def test_a_truncated_entry_is_detected_and_recomputed(pair, images, tmp_path):
    expected = ask(pair, tmp_path, images["square"], PROMPT, *SAMPLED).stdout
    for path in entries(tmp_path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = ask(pair, tmp_path, images["square"], PROMPT, *SAMPLED, "-v")
    assert again.stdout == expected
    assert "clip_encode" in again.stderr, "a damaged entry was used"
    cache = Cache(tmp_path / "entries")
    assert all(cache.get(p.suffix[1:], p.stem) is not None for p in entries(tmp_path)), "not rewritten whole"


def test_two_processes_writing_the_same_image_at_once(pair, images, tmp_path):
    cmd = [str(LLAVA), "ask", str(images["wide"]), PROMPT, "-m", str(pair[0]), "-n", "8", "-c", "1024", *SAMPLED]
    env = os.environ | {"LLAVA_CACHE": str(tmp_path)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    cache = Cache(tmp_path / "entries")
    assert len(entries(tmp_path)) == 2
    assert all(cache.get(p.suffix[1:], p.stem) is not None for p in entries(tmp_path))
    assert not list((tmp_path / "entries").glob("*/*.tmp")), "a temporary file was left behind"
    assert ask(pair, tmp_path, images["wide"], PROMPT, *SAMPLED, n=8).stdout == outs[0][0]


def test_batch_answers_equal_answers_one_image_at_a_time(pair, images, tmp_path):
    names = ("square", "wide")
    batch = ask(pair, tmp_path / "b", *(images[n] for n in names), PROMPT, "--json", *SAMPLED, "--no-cache")
    one_by_one = [
        json.loads(ask(pair, tmp_path / "b", images[n], PROMPT, "--json", *SAMPLED, "--no-cache").stdout)
        for n in names
    ]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(json.loads(line)) for line in batch.stdout.splitlines()] == [strip(r) for r in one_by_one]


def test_an_unwritable_cache_warns_once_and_answers_uncached(pair, images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = ask(pair, blocker, images["square"], images["wide"], PROMPT, "--json")
    assert proc.stderr.count("warning: image cache off") == 1, proc.stderr
    assert len(proc.stdout.splitlines()) == 2


def test_cache_clear_empties_it(pair, images, tmp_path):
    ask(pair, tmp_path, images["square"], PROMPT, n=2)
    proc = run_llava("cache", "clear", env={"LLAVA_CACHE": str(tmp_path)})
    assert proc.returncode == 0 and "removed 2 entries" in proc.stdout
    assert entries(tmp_path) == []


# -- the Cache class itself --------------------------------------------------------------------------------


def test_least_recently_used_entries_are_evicted_first(tmp_path):
    cache = Cache(tmp_path, max_bytes=3 * 1100)
    for i, key in enumerate(("aa01", "bb02", "cc03")):
        cache.put("emb", key, bytes([i]) * 1000)
        os.utime(cache._path("emb", key), (1000 + i, 1000 + i))
    assert cache.get("emb", "aa01") == b"\0" * 1000  # a hit makes aa01 the most recently used
    cache.put("emb", "dd04", b"\3" * 1000)
    assert cache.get("emb", "bb02") is None, "the least recently used entry survived"
    assert [cache.get("emb", k) is not None for k in ("aa01", "cc03", "dd04")] == [True, True, True]
    assert cache.info().size <= cache.max_bytes


def test_a_damaged_entry_is_a_miss_and_removed(tmp_path):
    cache = Cache(tmp_path)
    cache.put("state", "ab12", b"x" * 100)
    path = cache._path("state", "ab12")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert cache.get("state", "ab12") is None
    assert not path.exists()


def test_cache_size_cap_is_read_from_the_environment(monkeypatch):
    assert parse_size("2G") == 2 * 1024**3 and parse_size("500m") == 500 * 1024**2 and parse_size("123") == 123
    monkeypatch.setenv("LLAVA_CACHE_MAX", "64K")
    assert Cache().max_bytes == 64 * 1024
    monkeypatch.setenv("LLAVA_CACHE_MAX", "0")
    assert not Cache().enabled


def test_chat_takes_an_image_encoded_by_an_earlier_process_from_the_cache(pair, images, tmp_path):
    ask(pair, tmp_path, images["tall"], PROMPT, n=1)
    args = ("chat", images["tall"], "-m", pair[0], "-n", "8", "-c", "1024", "-v")
    cached = run_llava(*args, input=PROMPT + "\n", env={"LLAVA_CACHE": str(tmp_path)})
    uncached = run_llava(*args, "--no-cache", input=PROMPT + "\n", env={"LLAVA_CACHE": str(tmp_path)})
    assert cached.returncode == uncached.returncode == 0, cached.stderr[-500:]
    assert "clip_encode" not in cached.stderr and "clip_encode" in uncached.stderr
    assert cached.stdout == uncached.stdout
