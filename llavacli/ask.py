"""`llava ask`: one prompt over one or more images, each answered on its own, the model loaded once."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

from llavacli.engine import Engine, Sampling, Usage
from llavacli.errors import LlavaError
from llavacli.images import LoadedImage
from llavacli.prompts import Template


@dataclass
class Answer:
    image: str | None
    prompt: str
    answer: str
    tokens: int
    seconds: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)


def answer_one(
    engine: Engine,
    template: Template,
    prompt: str,
    image: LoadedImage | None,
    sampling: Sampling,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Answer:
    """A fresh conversation: system prompt, the image, the question; the answer streamed to on_text."""
    start = time.perf_counter()
    engine.reset()
    images = [image.image] if image is not None else []
    engine.feed(template.opening(system) + template.question(prompt, len(images)), images)
    usage = Usage()
    parts = []
    for piece in engine.generate(sampling, usage):
        parts.append(piece)
        if on_text is not None:
            on_text(piece)
    text = "".join(parts)
    return Answer(image.source if image else None, prompt, text.strip(), usage.generated_tokens, round(time.perf_counter() - start, 3))


def run_ask(
    engine: Engine,
    template: Template,
    prompt: str,
    images: Iterable[Callable[[], LoadedImage]] | None,
    sampling: Sampling,
    *,
    system: str | None,
    as_json: bool,
    labelled: bool,
    out: TextIO = sys.stdout,
    report_error: Callable[[str], None],
) -> int:
    """Answer every image; a bad image is reported and skipped. Returns the number of failures."""
    failures = 0
    if images is None:  # a text-only question
        _emit(engine, template, prompt, None, sampling, system, as_json, False, out)
        return 0
    for load in images:
        try:
            image = load()
            _emit(engine, template, prompt, image, sampling, system, as_json, labelled, out)
        except LlavaError as e:
            if not labelled:
                raise
            failures += 1
            report_error(str(e))
    return failures


def _emit(engine, template, prompt, image, sampling, system, as_json, labelled, out) -> None:
    if as_json:
        answer = answer_one(engine, template, prompt, image, sampling, system)
        out.write(answer.to_json() + "\n")
        out.flush()
        return
    if labelled:
        out.write(f"{image.label}: ")
    started = [False]

    def write(piece: str) -> None:
        if not started[0]:  # the model's answer begins with the space after "ASSISTANT:"
            piece = piece.lstrip()
            started[0] = bool(piece)
        out.write(piece)
        out.flush()

    answer_one(engine, template, prompt, image, sampling, system, on_text=write)
    out.write("\n")
    out.flush()
