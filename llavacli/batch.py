"""Several images, one prompt: each image's conversation in a llama.cpp sequence of its own, the answers
decoded together.

A decoding step reads all of the model's weights to make one token; a batch holding the next token of
every sequence reads them once for all. The prefixes (system prompt, image) are laid down one sequence
at a time, with the cache as `start_from_image` uses it; then every answer grows by a token per step.

Greedy answers equal the ones `answer_one` gives, token for token, on the test models and the demo
(tests/test_batch.py). A batch sums in another order inside llama.cpp's kernels, so where two logits
are within rounding of each other (random weights) the two ways can part after a few tokens.

Several images are mostly prompt evaluation: 576 image tokens each for LLaVA-1.5, against a few dozen
decoding steps shared by all of them. So `llava ask` loads the LLM for them without llama.cpp's repacked
weights (Engine's repack), which on a CPU decode faster and evaluate prompts slower. On the bench's
pair and 2-core x86 CPU (`bench/repack.py`, medians of 5): an image's 576 tokens 1.76 s plain against
2.75 s repacked, a step of 8 answers 114 ms against 95 ms, a step of one 22.5 ms against 18.3 ms, and
loading 0.09 s against 0.39 s. 8 images and 64 tokens: 38 s against 43 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from llavacli.ask import Answer, image_embeddings, split_at_image
from llavacli.cache import Cache, state_key
from llavacli.engine import Engine, Sampling, Utf8Stream
from llavacli.images import LoadedImage
from llavacli.prompts import Template

# On the bench's 2-core CPU (1B LLM at Q4_K_M) a step of 2, 4 and 8 answers cost 1.7x, 3.1x and 5.6x a
# step of one: 1.15x, 1.27x and 1.42x the tokens per second. Each answer also holds a KV cache of its own.
AUTO_MAX = 8
KV_ROUND = 256  # llama.cpp pads each sequence's context to this


@dataclass
class Plan:
    sequences: int  # conversations side by side
    positions: int  # context positions each one gets


def plan(engine: Engine, template: Template, prompt: str, system: str | None, max_tokens: int, n_images: int,
         parallel: int | None) -> Plan | None:
    """How many answers to decode together, or None when one at a time is the way.

    parallel None (auto): as many as fit in the KV cache --ctx-size asks for, at most AUTO_MAX; a number
    asks for exactly that many (more memory than --ctx-size if need be).
    """
    wanted = min(n_images, parallel if parallel is not None else AUTO_MAX)
    if wanted < 2:
        return None
    before, after = split_at_image(template, prompt, system)
    need = len(engine.tokens_of(before, at_start=True)) + engine.image_token_count()
    need += len(engine.tokens_of(after, at_start=False)) + max_tokens + 1
    positions = -(-need // KV_ROUND) * KV_ROUND
    if positions > engine.n_ctx:
        return None  # one conversation does not fit; the one-at-a-time path says so per image
    n = wanted if parallel is not None else min(wanted, engine.n_ctx // positions)
    return Plan(n, positions) if n >= 2 else None


@dataclass
class _Conversation:
    index: int
    image: LoadedImage
    started: float
    pos: int = 0
    sampler: object = None
    stream: Utf8Stream = field(default_factory=Utf8Stream)
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0


class Together:
    """Answers one prompt about groups of images, each group decoded side by side in engine.n_seq sequences."""

    def __init__(self, engine: Engine, template: Template, prompt: str, sampling: Sampling,
                 system: str | None = None, cache: Cache | None = None):
        self.engine, self.template, self.prompt, self.sampling, self.cache = engine, template, prompt, sampling, cache
        self.before, after = split_at_image(template, prompt, system)
        self.after_tokens = engine.tokens_of(after, at_start=False)
        self._prefix: tuple[bytes, int] | None = None  # the state after `before`, laid down once for all

    def answer(
        self,
        images: list[LoadedImage],
        on_text: Callable[[int, str], None] | None = None,
        on_done: Callable[[int, Answer], None] | None = None,
    ) -> list[Answer]:
        """One answer per image (at most engine.n_seq images); on_text(i, piece) as image i's answer grows,
        on_done(i, answer) when it is complete."""
        engine = self.engine
        if len(images) > engine.n_seq:
            raise ValueError(f"{len(images)} images for {engine.n_seq} sequences")
        talks = []
        for seq, image in enumerate(images):
            talk = _Conversation(seq, image, time.perf_counter())
            talk.pos = self._lay_prefix(seq, image)
            talk.sampler = engine.sampler(self.sampling)
            talks.append(talk)
        answers: list[Answer | None] = [None] * len(talks)

        def say(talk: _Conversation, piece: str) -> None:
            if piece:
                talk.pieces.append(piece)
                if on_text is not None:
                    on_text(talk.index, piece)

        def finish(talk: _Conversation) -> None:
            say(talk, talk.stream.rest())
            seconds = round(time.perf_counter() - talk.started, 3)
            answers[talk.index] = Answer(talk.image.source, self.prompt, "".join(talk.pieces).strip(), talk.tokens, seconds)
            if on_done is not None:
                on_done(talk.index, answers[talk.index])

        step = [(t.index, t.pos, self.after_tokens) for t in talks]
        for talk in talks:
            talk.pos += len(self.after_tokens)
        while step:
            indices = engine.seq_decode(step)
            live, step = [talks[seq] for seq, _, _ in step], []
            for talk, index in zip(live, indices):
                token = engine.sample(talk.sampler, index)
                if engine.is_end(token):
                    finish(talk)
                    continue
                talk.tokens += 1
                say(talk, talk.stream.add(engine.token_bytes(token)))
                if talk.tokens >= self.sampling.max_tokens or talk.pos + 1 > engine.n_ctx_seq:
                    finish(talk)
                    continue
                step.append((talk.index, talk.pos, [token]))
                talk.pos += 1
        return answers

    def _lay_prefix(self, seq: int, image: LoadedImage) -> int:
        """Sequence seq holds the text before the image and the image; returns its next position."""
        engine, cache = self.engine, self.cache
        skey = None
        if cache is not None and cache.enabled:
            skey = state_key(engine, image.sha256, self.template.name, self.before)
            saved = cache.get_state(skey)
            if saved is not None and engine.seq_restore(seq, saved[0]):
                return saved[1]
        if self._prefix is not None and engine.seq_restore(seq, self._prefix[0]):
            n_text = self._prefix[1]
        else:
            engine.seq_clear(seq)
            tokens = engine.tokens_of(self.before, at_start=True)
            engine.seq_decode([(seq, 0, tokens)])
            n_text = len(tokens)
            self._prefix = (engine.save_state(seq), n_text)
        pos = engine.seq_feed_image(seq, n_text, image.image, image_embeddings(engine, image, cache))
        if skey is not None:
            cache.put_state(skey, engine.save_state(seq), pos, n_text)
        return pos
