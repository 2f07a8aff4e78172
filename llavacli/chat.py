"""`llava chat`: a conversation kept in llama.cpp's KV cache, so each turn evaluates only its new tokens.

On a terminal it is a prompt_toolkit session (history file, multi-line input with Alt+Enter, tab-completed
paths after /image); otherwise it reads one turn per line from stdin, which makes it scriptable.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llavacli.ask import image_embeddings
from llavacli.cache import Cache
from llavacli.engine import Engine, Sampling, Usage
from llavacli.errors import BackendError, LlavaError
from llavacli.images import LoadedImage, load_image
from llavacli.prompts import Template

HELP = """\
/image PATH   attach an image (path, URL) to your next message
/clear        forget the conversation and its images
/system TEXT  set the system prompt (clears the conversation)
/save FILE    write the conversation as Markdown
/help         this list
/quit         leave (Ctrl-D works too)
Ctrl-C stops an answer and keeps the conversation; Alt+Enter starts a new line."""


def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "llava-cli" / "chat_history"


@dataclass
class Exchange:
    user: str
    images: list[str] = field(default_factory=list)
    answer: str = ""


class ChatSession:
    def __init__(self, engine: Engine, template: Template, sampling: Sampling, system: str | None, timings: bool, cache: Cache | None = None):
        self.engine, self.template, self.sampling = engine, template, sampling
        self.cache = cache  # image embeddings computed by earlier processes
        self.system = system
        self.timings = timings
        self.pending: list[LoadedImage] = []  # attached to the next message
        self.transcript: list[Exchange] = []
        self.out = sys.stdout

    # -- conversation ----------------------------------------------------------------------------------

    def add_image(self, image: LoadedImage) -> None:
        self.pending.append(image)

    def clear(self) -> None:
        self.engine.reset()
        self.transcript.clear()
        self.pending.clear()

    def turn(self, text: str) -> Exchange | None:
        """Feed one user message and stream the answer.

        Ctrl-C while the message is read forgets it; Ctrl-C during the answer keeps what was answered.
        """
        start = time.perf_counter()
        prompt = self.template.opening(self.system) if self.engine.n_past == 0 else self.template.end_of_answer
        images = [p.image for p in self.pending]
        prompt += self.template.question(text, len(images))
        exchange = Exchange(text, [p.source for p in self.pending])
        try:
            embeddings = [image_embeddings(self.engine, p, self.cache) for p in self.pending]
            n_prompt = self.engine.feed(prompt, images, embeddings)  # raises BackendError when the context is full
        except KeyboardInterrupt:
            self.out.write("[stopped]\n")
            return None
        self.pending.clear()
        self.transcript.append(exchange)
        usage = Usage()
        first = True
        try:
            for piece in self.engine.generate(self.sampling, usage):
                if first:
                    piece, first = piece.lstrip(), not piece.strip()
                exchange.answer += piece
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        if usage.stopped_by == "context":
            self.note("the context is full; /clear starts over")
        if self.timings:
            took = time.perf_counter() - start
            self.note(f"turn {len(self.transcript)}: {n_prompt} prompt + {usage.generated_tokens} generated tokens, {took:.3f} s")
        return exchange

    # -- commands --------------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/clear":
            self.clear()
            self.note("conversation cleared")
        elif name == "/image":
            if not arg:
                self.note("usage: /image PATH")
            else:
                image = load_image(os.path.expanduser(arg))
                self.add_image(image)
                self.note(f"attached {image.label} to your next message")
        elif name == "/system":
            self.system = arg or None
            self.clear()
            self.note("system prompt set; conversation cleared")
        elif name == "/save":
            self.save(arg)
        else:
            self.note(f"unknown command {name}; /help lists them")
        return True

    def save(self, arg: str) -> None:
        if not arg:
            self.note("usage: /save FILE")
            return
        path = Path(arg).expanduser()
        if path.exists():
            self.note(f"{path} exists; choose another name")
            return
        lines = ["# llava chat", ""]
        if self.system:
            lines += [f"*System:* {self.system}", ""]
        for ex in self.transcript:
            lines += [f"![image]({src})" for src in ex.images]
            lines += [f"**User:** {ex.user}", "", f"**Assistant:** {ex.answer}", ""]
        path.write_text("\n".join(lines))
        self.note(f"saved to {path}")

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # -- input loops -----------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        if not line.strip():
            return True
        try:
            if line.lstrip().startswith("/"):
                return self.command(line)
            self.turn(line)
        except BackendError as e:
            self.note(f"llava: {e}. /clear starts over.")
        except LlavaError as e:
            self.note(f"llava: error: {e}")
        return True

    def run(self) -> None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            self._run_terminal()
        else:
            for line in sys.stdin:
                if not self.handle(line.rstrip("\n")):
                    break

    def _run_terminal(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        hist = history_path()
        hist.parent.mkdir(parents=True, exist_ok=True)
        session = PromptSession(history=FileHistory(str(hist)), completer=_completer(), key_bindings=_bindings())
        self.note(f"llava chat: {self.engine.model_path.name}. /help for commands, Ctrl-D to leave.")
        while True:
            label = f"[{len(self.pending)} image{'s' if len(self.pending) != 1 else ''}] " if self.pending else ""
            try:
                line = session.prompt(f"{label}llava> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not self.handle(line):
                break


def _completer():
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter
    from prompt_toolkit.document import Document

    commands = WordCompleter(["/image", "/clear", "/system", "/save", "/help", "/quit"], sentence=True)
    paths = PathCompleter(expanduser=True)

    class ChatCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if text.startswith(("/image ", "/save ")):
                arg = text.split(" ", 1)[1]
                yield from paths.get_completions(Document(arg, len(arg)), complete_event)
            elif text.startswith("/") and " " not in text:
                yield from commands.get_completions(document, complete_event)

    return ChatCompleter()


def _bindings():
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    return kb
