"""`llava chat`: scripted through stdin, and interactive through a pseudo-terminal."""

from __future__ import annotations

import re

import numpy as np
import pexpect
import pytest
from PIL import Image

from conftest import LLAVA, run_llava
from llavacli.engine import Engine, Sampling
from llavacli.prompts import Turn, get_template

TURN_RE = re.compile(r"turn (\d+): (\d+) prompt \+ (\d+) generated tokens")


@pytest.fixture(scope="module")
def pair(checkpoints):
    return checkpoints.gguf("hf15", "f32")


def _turns(stderr: str) -> list[tuple[int, int]]:
    return [(int(p), int(g)) for _, p, g in TURN_RE.findall(stderr)]


def test_each_turn_evaluates_only_its_new_tokens(pair, images):
    script = "What shape is it?\nAnd its colour?\nThanks.\n"
    proc = run_llava("chat", images["square"], "-m", pair[0], "-n", "6", "--timings", input=script)
    assert proc.returncode == 0, proc.stderr
    turns = _turns(proc.stderr)
    assert len(turns) == 3
    assert turns[0][0] > 576  # system prompt + 576 image tokens + the question
    assert all(prompt < 100 for prompt, _ in turns[1:]), turns  # neither the image nor earlier turns again


def test_chat_answers_as_the_engine_does_turn_by_turn(pair, images):
    proc = run_llava("chat", images["wide"], "-m", pair[0], "-n", "8", input="Describe it.\nWhat else?\n")
    assert proc.returncode == 0, proc.stderr
    t = get_template("vicuna_v1")
    with Engine(*pair, n_ctx=2048) as engine:
        engine.feed(t.opening() + t.question("Describe it.", 1), [Image.open(images["wide"])])
        first = "".join(engine.generate(Sampling(max_tokens=8)))
        engine.feed(t.end_of_answer + t.question("What else?"))
        second = "".join(engine.generate(Sampling(max_tokens=8)))
    assert proc.stdout.splitlines() == [first.strip(), second.strip()]


def test_a_conversation_kept_in_the_cache_equals_one_evaluated_at_once(pair, images):
    """What chat relies on: feeding turn by turn gives the logits of feeding the whole conversation.

    Chat splits the text where a turn ends, just before the end-of-answer marker "</s>": a special token,
    at which llama.cpp's tokeniser splits anyway, so the turns tokenise as the whole conversation does.
    """
    t = get_template("vicuna_v1")
    img = Image.open(images["tall"])
    turns = [Turn("Describe it.", 1, "A square on a grey background."), Turn("What colour is the square?")]
    with Engine(*pair, n_ctx=2048) as engine:
        engine.feed(t.opening() + t.question(turns[0].user, 1) + " " + turns[0].assistant, [img])
        engine.feed(t.end_of_answer + t.question(turns[1].user))
        by_turn = engine.logits()
        engine.reset()
        engine.feed(t.render(turns), [img])
        at_once = engine.logits()
    cos = float((by_turn * at_once).sum() / (np.linalg.norm(by_turn) * np.linalg.norm(at_once)))
    assert cos > 0.99999 and by_turn.argmax() == at_once.argmax()


def test_image_command_adds_an_image_mid_conversation(pair, images, tmp_path):
    transcript = tmp_path / "chat.md"
    script = f"Hello\n/image {images['tall']}\nAnd this one?\n/save {transcript}\n/quit\nnot reached\n"
    proc = run_llava("chat", "-m", pair[0], "-n", "4", "--timings", input=script)
    assert proc.returncode == 0, proc.stderr
    turns = _turns(proc.stderr)
    assert len(turns) == 2
    assert turns[0][0] < 576 < turns[1][0]  # the image arrives with the second message
    text = transcript.read_text()
    assert f"![image]({images['tall']})" in text
    assert text.index("Hello") < text.index(str(images["tall"])) < text.index("And this one?")


def test_save_never_overwrites(pair, tmp_path):
    existing = tmp_path / "keep.md"
    existing.write_text("mine")
    proc = run_llava("chat", "-m", pair[0], "-n", "2", input=f"Hi\n/save {existing}\n")
    assert proc.returncode == 0
    assert existing.read_text() == "mine"
    assert "exists" in proc.stderr


def test_a_full_context_is_reported_and_the_session_goes_on(pair, images):
    script = f"/image {images['square']}\nFirst?\n/image {images['wide']}\nSecond?\n/clear\nThird?\n"
    proc = run_llava("chat", "-m", pair[0], "-n", "4", "-c", "1024", "--timings", input=script)
    assert proc.returncode == 0, proc.stderr
    assert "context" in proc.stderr and "/clear" in proc.stderr
    assert len(_turns(proc.stderr)) == 2  # the first and the third; the second did not fit
    assert "Traceback" not in proc.stderr


def test_bad_image_command_is_reported_and_the_session_goes_on(pair, tmp_path):
    proc = run_llava("chat", "-m", pair[0], "-n", "2", "--timings", input=f"/image {tmp_path}/nope.png\nHi\n")
    assert proc.returncode == 0
    assert "nope.png" in proc.stderr and len(_turns(proc.stderr)) == 1


def test_interactive_session_in_a_terminal(pair, images, tmp_path):
    env = {"LLAVA_CACHE": str(tmp_path / "cache"), "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm"}
    child = pexpect.spawn(
        str(LLAVA), ["chat", str(images["square"]), "-m", str(pair[0]), "-n", "3000", "-c", "4096"],
        env=env, encoding="utf-8", timeout=60, dimensions=(40, 200),
    )
    child.expect("/help")
    child.expect("llava>")
    # Tab offers the path after /image; a second Tab takes it; Enter closes the menu, Enter sends.
    partial = str(images["wide"])[:-6]
    child.send(f"/image {partial}\t")
    child.expect("wide.png")
    child.send("\t")
    child.send("\r")
    if child.expect([r"attached \S*wide.png", pexpect.TIMEOUT], timeout=3) == 1:
        child.send("\r")  # that Enter only took the highlighted completion
        child.expect(r"attached \S*wide.png")
    child.expect("llava>")
    # Ctrl-C stops a long answer and keeps the session.
    child.send("Tell me a long story.\r")
    child.expect(r"story\.")
    child.expect(r"\x1b\[\?2004l")
    child.expect(r"[^\x1b\r\n]{20}")  # the answer streams: the terminal is back in cooked mode
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("llava>")
    child.send("/help\r")
    child.expect("/system TEXT")
    child.expect("llava>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "state" / "llava-cli" / "chat_history").read_text()
    assert "Tell me a long story." in history
