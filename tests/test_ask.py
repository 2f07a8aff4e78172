"""`llava ask` driven as a user drives it: the installed command, real GGUF files, real images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from PIL import Image

from conftest import LLAVA, run_llava
from llavacli.engine import Engine, Sampling, Usage
from llavacli.prompts import get_template

PROMPT = "What shape is in the picture?"


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints.gguf("hf15", "f32")


def _expected_answer(pair, image_path, max_tokens=24) -> str:
    """The greedy answer computed in-process through the engine, without the CLI."""
    t = get_template("vicuna_v1")
    with Engine(*pair, n_ctx=2048) as engine:
        engine.feed(t.opening() + t.question(PROMPT, 1), [Image.open(image_path)])
        return "".join(engine.generate(Sampling(max_tokens=max_tokens))).strip()


def test_ask_streams_the_answer_and_nothing_else_to_stdout(pair, images):
    proc = run_llava("ask", images["wide"], PROMPT, "-m", pair[0], "-n", "24")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _expected_answer(pair, images["wide"]) + "\n"
    assert "llama_model_loader" not in proc.stderr and "clip_model_loader" not in proc.stderr


def test_an_answer_nothing_follows_skips_evaluating_its_last_token(pair, images):
    """`llava ask` (keep=False) samples the same answer as a chat turn, one decoding step shorter."""
    t = get_template("vicuna_v1")
    with Engine(*pair, n_ctx=2048) as engine:
        answers, n_past = {}, {}
        for keep in (True, False):
            engine.reset()
            engine.feed(t.opening() + t.question(PROMPT, 1), [Image.open(images["wide"])])
            start, usage = engine.n_past, Usage()
            answers[keep] = "".join(engine.generate(Sampling(max_tokens=12), usage, keep=keep))
            assert usage.stopped_by == "length" and usage.generated_tokens == 12
            n_past[keep] = engine.n_past - start
    assert answers[False] == answers[True]
    assert (n_past[True], n_past[False]) == (12, 11)


def test_answering_imports_neither_torch_nor_the_converters_libraries(pair, images):
    """The runtime must not import torch; gguf-py and rich cost every answer 0.1 s of start-up, and
    llama.cpp reads the GGUF headers itself (ggufmeta)."""
    script = (
        "import sys\n"
        "from llavacli.cli import main\n"
        f"rc = main(['ask', {str(images['square'])!r}, 'hi', '-m', {str(pair[0])!r}, '-n', '4'])\n"
        "heavy = sorted({'torch', 'transformers', 'gguf', 'rich', 'yaml', 'urllib.request'} & set(sys.modules))\n"
        "print('rc', rc, 'imported', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([str(LLAVA.parent / "python"), "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "rc 0 imported []"


def test_verbose_shows_llama_cpp_log_on_stderr(pair, images):
    proc = run_llava("ask", images["wide"], PROMPT, "-m", pair[0], "-n", "2", "-v")
    assert proc.returncode == 0
    assert "llama_model_loader" in proc.stderr
    assert "llama_model_loader" not in proc.stdout


def test_the_vision_model_loads_beside_the_llm_and_answers_as_when_loaded_after_it(pair, images):
    """A first question loads the mmproj on the LLM file opened vocabulary-only, while the LLM loads; the
    answer is the one of an engine that loads it later on the full LLM."""
    proc = run_llava("ask", images["wide"], PROMPT, "-m", pair[0], "-n", "12", "--flash-attn", "off", "--no-cache", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "vocab only" in proc.stderr, "the vision model was not loaded beside the LLM"
    t = get_template("vicuna_v1")
    with Engine(*pair, n_ctx=4096, flash_attn=False) as engine:
        engine.feed(t.opening() + t.question(PROMPT, 1), [Image.open(images["wide"])])
        want = "".join(engine.generate(Sampling(max_tokens=12)))
    assert proc.stdout.strip() == want.strip()


def test_mmproj_is_found_beside_the_model(pair, images):
    explicit = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "--mmproj", pair[1], "-n", "8")
    implicit = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "-n", "8")
    assert explicit.returncode == implicit.returncode == 0
    assert explicit.stdout == implicit.stdout


def test_same_seed_gives_the_same_sampled_answer(pair, images):
    args = ("ask", images["square"], PROMPT, "-m", pair[0], "-n", "24", "--temperature", "1.5", "--top-p", "1")
    first, again = run_llava(*args, "--seed", "7"), run_llava(*args, "--seed", "7")
    other = run_llava(*args, "--seed", "8")
    assert first.returncode == again.returncode == other.returncode == 0
    assert first.stdout == again.stdout
    greedy = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "-n", "24")
    assert {first.stdout, other.stdout, greedy.stdout} != {first.stdout}, "sampling ignores temperature or seed"


def test_several_images_are_answered_each_on_its_own(pair, images):
    proc = run_llava("ask", images["square"], images["wide"], PROMPT, "-m", pair[0], "-n", "24")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        f"{images['square']}: {_expected_answer(pair, images['square'])}",
        f"{images['wide']}: {_expected_answer(pair, images['wide'])}",
    ]


def test_json_prints_one_object_per_image(pair, images):
    proc = run_llava("ask", images["square"], images["tall"], PROMPT, "-m", pair[0], "-n", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(images["square"]), str(images["tall"])]
    for r in records:
        assert r["prompt"] == PROMPT
        assert 0 < r["tokens"] <= 12 and r["seconds"] > 0
        assert r["answer"] == _expected_answer(pair, r["image"], max_tokens=12)


def test_ask_reads_image_bytes_from_stdin(pair, images):
    proc = run_llava("ask", "-", PROMPT, "-m", pair[0], "-n", "24", input=images["tall"].read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == _expected_answer(pair, images["tall"]) + "\n"


def test_images_from_reads_a_list_of_paths(pair, images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{images['square']}\n\n{images['wide']}\n")
    proc = run_llava("ask", "--images-from", listing, PROMPT, "-m", pair[0], "-n", "4")
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [str(images["square"]), str(images["wide"])]
    piped = run_llava("ask", "--images-from", "-", PROMPT, "-m", pair[0], "-n", "4", input=listing.read_text())
    assert piped.stdout == proc.stdout


def test_a_bad_image_in_a_batch_is_reported_and_the_rest_answered(pair, images, tmp_path):
    proc = run_llava("ask", images["square"], tmp_path / "missing.png", images["wide"], PROMPT, "-m", pair[0], "-n", "4")
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 2
    assert proc.stderr.count("llava: error:") == 1 and "missing.png" in proc.stderr


def test_schema_constrains_the_answer_to_parseable_json(pair, images):
    schema = '{"type":"object","properties":{"shapes":{"type":"integer"}},"required":["shapes"]}'
    proc = run_llava("ask", images["square"], "How many shapes?", "-m", pair[0], "-n", "40", "--schema", schema)
    assert proc.returncode == 0, proc.stderr
    value = json.loads(proc.stdout)
    assert isinstance(value["shapes"], int)


def test_template_option_changes_the_prompt(pair, images):
    vicuna = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "-n", "24")
    plain = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "-n", "24", "--template", "plain")
    system = run_llava("ask", images["square"], PROMPT, "-m", pair[0], "-n", "24", "--system", "Answer in French.")
    assert vicuna.returncode == plain.returncode == system.returncode == 0
    assert len({vicuna.stdout, plain.stdout, system.stdout}) > 1


def test_a_closed_pipe_ends_quietly(pair, images):
    cmd = f"'{LLAVA}' ask '{images['square']}' '{PROMPT}' -m '{pair[0]}' -n 200 | head -c 1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=120)
    assert len(proc.stdout) == 1
    assert proc.stderr == b""


def test_ctrl_c_exits_130_without_a_traceback(pair, images):
    proc = subprocess.Popen(
        [str(LLAVA), "ask", str(images["square"]), PROMPT, "-m", str(pair[0]), "-n", "3000", "-c", "4096"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.read(1)  # generation has started
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err


# -- bad input: one line naming the culprit, exit 1 (2 for usage), never a traceback ------------------------


def _one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llava: error:"), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.jpg").write_text("these are my notes, not a picture\n")
    (root / "empty.png").write_bytes(b"")
    png = images["square"].read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "doc.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n")
    bomb = Image.new("1", (12000, 12000))
    bomb.save(root / "bomb.png", optimize=True)
    return root


@pytest.mark.parametrize(
    "name, needle",
    [("missing.png", "no such file"), ("", "directory"), ("notes.jpg", "notes.jpg"), ("empty.png", "empty"),
     ("truncated.png", "truncated.png"), ("bomb.png", "bomb.png"), ("doc.pdf", "doc.pdf")],
)
def test_bad_images_give_a_one_line_error(pair, bad_files, name, needle):
    proc = run_llava("ask", bad_files / name if name else bad_files, PROMPT, "-m", pair[0])
    _one_line_error(proc, 1, needle)


def test_bad_model_files_give_a_one_line_error(pair, images, tmp_path, checkpoints):
    text, mmproj = pair
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(text.read_bytes()[: text.stat().st_size // 2])
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    from llavacli.backend import CONFORMANCE_DIR

    other_width = CONFORMANCE_DIR / "tiny.mmproj.gguf"  # a 32-wide projector against a 96-wide LLM
    no_feed_forward = _gguf_with_an_empty_tensor(tmp_path / "no-ff.gguf")
    img = images["square"]
    _one_line_error(run_llava("ask", img, PROMPT, "-m", truncated, "--mmproj", mmproj), 1, "truncated")
    _one_line_error(run_llava("ask", img, PROMPT, "-m", not_gguf, "--mmproj", mmproj), 1, "not a GGUF")
    _one_line_error(run_llava("ask", img, PROMPT, "-m", mmproj, "--mmproj", text), 1, "--mmproj")
    _one_line_error(run_llava("ask", img, PROMPT, "-m", text, "--mmproj", text), 1, "not an mmproj")
    _one_line_error(run_llava("ask", img, PROMPT, "-m", text, "--mmproj", other_width), 1, "not a pair")
    _one_line_error(run_llava("ask", img, PROMPT, "-m", "no-such-model"), 1, "no-such-model")
    # llama.cpp would load it and abort the process in its first matrix product
    _one_line_error(run_llava("ask", img, PROMPT, "-m", no_feed_forward, "--mmproj", mmproj), 1, "ffn_down.weight is empty")


def _gguf_with_an_empty_tensor(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_embedding_length(96)
    writer.add_feed_forward_length(0)
    writer.add_tensor("token_embd.weight", np.zeros((8, 96), np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((96, 0), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_prompt_longer_than_the_context_names_the_limit(pair, images):
    line = _one_line_error(run_llava("ask", images["square"], "word " * 400, "-m", pair[0], "-c", "512"), 1, "512")
    assert "context" in line


def test_an_unreachable_url_is_a_clear_error(pair):
    _one_line_error(run_llava("ask", "http://127.0.0.1:9/cat.png", PROMPT, "-m", pair[0]), 1, "127.0.0.1:9")


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--bogus"], ["--gpu-layers", "many"], ["--flash-attn", "maybe"]])
def test_usage_errors_exit_2(pair, images, args):
    _one_line_error(run_llava("ask", images["square"], PROMPT, "-m", pair[0], *args), 2, args[0])


def test_an_image_without_a_prompt_is_a_usage_error_not_a_text_question(pair, images):
    """`llava ask photo.jpg` alone would otherwise ask the model about the words "photo.jpg"."""
    line = _one_line_error(run_llava("ask", images["square"], "-m", pair[0]), 2, "no PROMPT")
    assert str(images["square"]) in line


def test_version():
    proc = run_llava("--version")
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import version

    assert proc.stdout.strip() == f"llava {version('llava-cli')}"


@pytest.mark.parametrize("at_start", [True, False])
def test_text_is_tokenized_as_libmtmd_tokenizes_it(pair, at_start):
    """Text without images skips libmtmd (so the vision model need not load); the tokens must be the ones
    mtmd_tokenize gives, BOS at the start and special tokens such as "</s>" included."""
    t = get_template("vicuna_v1")
    texts = [t.opening(), t.question(PROMPT, 0), " A circle.</s>USER: and <s> then? ASSISTANT:", "", "  ünïcödé ✓"]
    with Engine(*pair, n_ctx=512) as engine:
        ours = [engine.tokens_of(text, at_start) for text in texts]
        assert engine._mctx is None, "tokenizing text loaded the vision model"
        for text, tokens in zip(texts, ours):
            chunks = engine._tokenize(text, [], at_start)
            try:
                assert tokens == [tok for _, toks in engine._chunks(chunks) for tok in toks or []], text
            finally:
                engine._mtmd.mtmd_input_chunks_free(chunks)
        bos = engine.llama.token_bos()
    assert (ours[0][0] == bos) == at_start
