"""`llava ask`: one prompt over one or more images, each answered on its own, the model loaded once."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from llavacli.cache import Cache, embeddings_key, state_key
from llavacli.engine import Engine, Sampling, Usage
from llavacli.errors import LlavaError
from llavacli.images import LoadedImage
from llavacli.prompts import IMAGE, Template


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
    cache: Cache | None = None,
) -> Answer:
    """A fresh conversation: system prompt, the image, the question; the answer streamed to on_text."""
    start = time.perf_counter()
    if image is None:
        engine.reset()
        engine.feed(template.opening(system) + template.question(prompt, 0))
    else:
        before, after = split_at_image(template, prompt, system)
        start_from_image(engine, template.name, before, image, cache)
        engine.feed(after)
    usage = Usage()
    parts = []
    for piece in engine.generate(sampling, usage, keep=False):  # the next answer starts from the image again
        parts.append(piece)
        if on_text is not None:
            on_text(piece)
    answer = "".join(parts)
    return Answer(image.source if image else None, prompt, answer.strip(), usage.generated_tokens, round(time.perf_counter() - start, 3))


def split_at_image(template: Template, prompt: str, system: str | None) -> tuple[str, str]:
    """A one-image conversation's prompt: the text before the image, and after it."""
    text = template.opening(system) + template.question(prompt, 1)
    cut = text.index(IMAGE)
    return text[:cut], text[cut + len(IMAGE) :]


def start_from_image(engine: Engine, template_name: str, before: str, image: LoadedImage, cache: Cache | None) -> None:
    """Make the context hold `before` then the image, doing as little of that work as the cache allows.

    The three steps are the same whether or not the cache helps, so a cached answer equals an uncached one:
    the text before the image (kept from the previous image of a batch), the image's embeddings (the
    vision encoder), and the LLM's pass over them; the last two are what the cache saves.
    """
    skey = None
    if cache is not None and cache.enabled:
        skey = state_key(engine, image.sha256, template_name, before)
        saved = cache.get_state(skey)
        if saved is not None:
            state, n_past, n_text = saved
            if engine.load_state(state, n_past, (before, n_text)):
                return
    embd = cached_embeddings(engine, image, cache)
    if embd is None:
        engine.preload_vision()  # loads beside the LLM's pass over the text before the image
    n_text = engine.start_with(before)
    if embd is None:
        embd = encode_and_keep(engine, image, cache)
    engine.feed(IMAGE, [image.image], [embd])
    if skey is not None:
        cache.put_state(skey, engine.save_state(), engine.n_past, n_text)


def vision_first(template: str | None, system: str | None, prompt: str, image: LoadedImage | None, cache: Cache | None):
    """Engine's vision_first for one question about `image` (None: several images, whose batch plan measures
    an image at once): the vision model is needed unless the cache holds the image's state or embeddings."""

    def needed(engine: Engine) -> bool:
        if image is None or cache is None or not cache.enabled:
            return True
        from llavacli.runtime import pick_template

        t = pick_template(template, engine)
        before, _ = split_at_image(t, prompt, system)
        keys = (("state", state_key(engine, image.sha256, t.name, before)), ("emb", embeddings_key(engine, image.sha256)))
        return not any(cache.has(kind, key) for kind, key in keys)

    return needed


def cached_embeddings(engine: Engine, image: LoadedImage, cache: Cache | None):
    """The image's projected embeddings if the cache has them, else None."""
    if cache is None or not cache.enabled:
        return None
    return cache.get_embeddings(embeddings_key(engine, image.sha256))


def encode_and_keep(engine: Engine, image: LoadedImage, cache: Cache | None):
    """The vision encoder's embeddings of the image, stored in the cache for next time."""
    embd = engine.image_embeddings(image.image)
    if cache is not None and cache.enabled:
        cache.put_embeddings(embeddings_key(engine, image.sha256), embd)
    return embd


def image_embeddings(engine: Engine, image: LoadedImage, cache: Cache | None):
    """The image's projected embeddings, from the cache when it has them."""
    embd = cached_embeddings(engine, image, cache)
    return embd if embd is not None else encode_and_keep(engine, image, cache)


def run_ask(
    engine: Engine,
    template: Template,
    prompt: str,
    images: list[Callable[[], LoadedImage]] | None,
    sampling: Sampling,
    *,
    system: str | None,
    as_json: bool,
    labelled: bool,
    out: TextIO = sys.stdout,
    report_error: Callable[[str], None],
    cache: Cache | None = None,
    parallel: int | None = None,
) -> int:
    """Answer every image; a bad image is reported and skipped. Returns the number of failures.

    Several images are answered side by side (llavacli.batch) when the context has room for them;
    parallel: how many at once (None: as many as --ctx-size holds; 1: one at a time).
    """
    if images is None:  # a text-only question
        _emit(engine, template, prompt, None, sampling, system, as_json, False, out, cache)
        return 0
    if labelled and len(images) > 1:
        from llavacli import batch

        shape = batch.plan(engine, template, prompt, system, sampling.max_tokens, len(images), parallel)
        if shape is not None:
            engine.use_sequences(shape.sequences, shape.positions)
            together = batch.Together(engine, template, prompt, sampling, system, cache)
            return _run_together(together, images, shape.sequences, as_json, out, report_error)
    failures = 0
    for load in images:
        try:
            image = load()
            _emit(engine, template, prompt, image, sampling, system, as_json, labelled, out, cache)
        except LlavaError as e:
            if not labelled:
                raise
            failures += 1
            report_error(str(e))
    return failures


def _run_together(together, loaders, group_size: int, as_json: bool, out: TextIO, report_error) -> int:
    failures = 0
    for first in range(0, len(loaders), group_size):
        group = []
        for load in loaders[first : first + group_size]:
            try:
                group.append(load())
            except LlavaError as e:
                failures += 1
                report_error(str(e))
        if group:
            printer = _InOrder([image.label for image in group], as_json, out)
            together.answer(group, on_text=printer.text, on_done=printer.done)
    return failures


class _InOrder:
    """Answers in the images' order, whole lines; the earliest unfinished answer streams as it grows."""

    def __init__(self, labels: list[str], as_json: bool, out: TextIO):
        self.labels, self.as_json, self.out = labels, as_json, out
        self.current = 0
        self.held: dict[int, list[str]] = {i: [] for i in range(len(labels))}
        self.finished: dict[int, Answer] = {}
        self.begun = False  # the current answer's label is out
        self.leading = True  # nothing of the current answer written yet but whitespace

    def text(self, i: int, piece: str) -> None:
        if self.as_json:
            return
        self.held[i].append(piece)
        if i == self.current:
            self._flush()

    def done(self, i: int, answer: Answer) -> None:
        self.finished[i] = answer
        while self.current in self.finished:
            if self.as_json:
                self.out.write(self.finished[self.current].to_json() + "\n")
            else:
                self._flush()
                self.out.write("\n")
            self.out.flush()
            self.current += 1
            self.begun = False
            if self.current < len(self.labels) and not self.as_json:
                self._flush()

    def _flush(self) -> None:
        if not self.begun:
            self.out.write(f"{self.labels[self.current]}: ")
            self.begun, self.leading = True, True
        text = "".join(self.held[self.current])
        self.held[self.current] = []
        if self.leading:  # the model's answer begins with the space after "ASSISTANT:"
            text = text.lstrip()
            self.leading = not text
        self.out.write(text)
        self.out.flush()


def _emit(engine, template, prompt, image, sampling, system, as_json, labelled, out, cache) -> None:
    if as_json:
        answer = answer_one(engine, template, prompt, image, sampling, system, cache=cache)
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

    answer_one(engine, template, prompt, image, sampling, system, on_text=write, cache=cache)
    out.write("\n")
    out.flush()
