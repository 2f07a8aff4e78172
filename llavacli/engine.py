"""One loaded model: a text GGUF and its mmproj, run by llama.cpp through llama-cpp-python and libmtmd.

The engine keeps one conversation in llama.cpp's KV cache. `feed()` evaluates new prompt text and images
after what is already there, `generate()` samples the answer and leaves it in the cache too, so a chat turn
costs only its own tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from llavacli import backend
from llavacli.errors import BackendError, InputError, ModelError
from llavacli.ggufmeta import (
    CLIP_IMAGE_SIZE_KEY,
    IMAGE_MODE_KEY,
    TEMPLATE_KEY,
    mmproj_output_length,
    read_gguf,
    text_embedding_length,
)
from llavacli.images import PAD, preprocess
from llavacli.prompts import DEFAULT_TEMPLATE, IMAGE
from llavacli.seqstate import as_one_stream, as_streams

REPACK_THREADS_ENV = "GGML_REPACK_THREADS"  # read by backend/repack-threads.patch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy, as LLaVA's evaluation decodes
    top_p: float = 0.95
    seed: int = 0
    max_tokens: int = 512
    grammar: str | None = None  # a JSON schema (as text) the answer must satisfy


@dataclass
class Usage:
    generated_tokens: int = 0
    stopped_by: str = ""  # "eos", "length" or "context"
    token_ids: list[int] = field(default_factory=list)  # the sampled tokens, end-of-sequence included


class Engine:
    def __init__(
        self,
        model: Path,
        mmproj: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
        vision_offload: bool = True,
        flash_attn: bool | None = None,
        repack: bool = True,
        verbose: bool = False,
        vision_first: Callable[[Engine], bool] | None = None,
    ):
        """vision_first, asked once the file headers are read (before any loading), says whether an image
        will need the vision model at once; then it loads beside the LLM rather than after it.

        repack: llama.cpp's default, weights kept on the CPU are laid out anew at load for its repacked
        kernels. On this project's 2-core x86 CPU (1B LLM at Q4_K_M) that decodes one answer 1.2x as fast,
        but takes 1.6x as long over a prompt and 0.2-0.3 s more to load; see llavacli.batch for who turns it off.
        """
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._llama_cpp, self._mtmd = llama_cpp, mtmd_cpp
        text_info = read_gguf(model, "model")
        proj_info = read_gguf(mmproj, "mmproj")
        _check_pair(text_info, proj_info)
        self.model_path, self.mmproj_path = Path(model), Path(mmproj)
        self.n_gpu_layers, self.vision_offload = n_gpu_layers, bool(vision_offload and n_gpu_layers != 0)
        self.template_name = text_info.get(TEMPLATE_KEY) or DEFAULT_TEMPLATE
        self.image_size = int(proj_info.get(CLIP_IMAGE_SIZE_KEY))
        self.image_mode = proj_info.get(IMAGE_MODE_KEY) or PAD
        mmproj_to_load = backend.runnable_mmproj(proj_info)

        backend.capture_logs(verbose)
        threads = n_threads or max(1, os.cpu_count() or 1)
        if flash_attn is None:  # llama.cpp's "auto" is not reachable through Llama(): on where layers go to a GPU
            flash_attn = n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        self.flash_attn = flash_attn
        # With every layer on a GPU no weight is repacked, so the setting is moot: the cache keys it as the default.
        self.repack = repack or (n_gpu_layers < 0 and bool(llama_cpp.llama_supports_gpu_offload()))
        self.n_batch = min(n_ctx, 2048)
        self._mmproj_to_load, self._threads, self._verbose = mmproj_to_load, threads, verbose
        self._mctx = None  # the vision model, loaded on first use: see _vision
        self._loading: threading.Thread | None = None  # see preload_vision
        self._load_error: BaseException | None = None
        self._vocab_model = None  # see _preload_beside_the_llm
        self.llama = None
        try:
            with _deferred_ctrl_c():  # llama.cpp logs through Python while it loads: see _deferred_ctrl_c
                beside = vision_first is not None and vision_first(self)
                if beside:
                    self._preload_beside_the_llm()
                # With the vision model loading on another core, one repacking thread leaves it that core.
                with _model_params(use_extra_bufts=repack), _repack_threads(1 if beside else threads):
                    self.llama = llama_cpp.Llama(
                        model_path=str(model),
                        n_ctx=n_ctx,
                        n_batch=self.n_batch,
                        n_ubatch=self.n_batch,
                        n_threads=threads,
                        n_threads_batch=threads,
                        n_gpu_layers=n_gpu_layers,
                        flash_attn=flash_attn,
                        verbose=verbose,
                    )
        except BaseException as e:
            error = ModelError(f"llama.cpp could not load model {model}: {backend.last_error()}") if isinstance(e, ValueError) else None
            self.close()  # a vision model still loading in the background must not outlive the process's exit
            if error is not None:
                raise error from None
            raise
        backend.capture_logs(verbose)  # Llama() installs its own logger; ours wins again

        self._marker = mtmd_cpp.mtmd_default_marker().decode()
        self.n_past = 0
        self._text_prefix: tuple[str, int] | None = None  # (text, tokens) known to open the context
        self.n_seq, self.n_ctx_seq, self._batch = 1, self.n_ctx, None  # see use_sequences()

    @property
    def _vision(self):
        """libmtmd's context: the vision encoder and projector, loaded when an image first needs them (in
        the background, if vision_first or preload_vision started it earlier: this waits for it).

        A question whose image state comes from the cache, and a chat turn after the first, never do;
        they skip loading the mmproj: a second question about the bench's pair took 5.0 s instead of 5.6 s
        on this project's 2-core CPU.
        """
        with _deferred_ctrl_c():
            if self._loading is not None:
                self._loading.join()
                self._loading = None
            if self._load_error is not None:
                error, self._load_error = self._load_error, None
                raise error
            if self._mctx is None:
                self._load_vision()
        return self._mctx

    def _preload_beside_the_llm(self) -> None:
        """Load the vision model in the background while Llama() loads the LLM.

        libmtmd takes the text model only for its vocabulary and embedding width, so it gets the model file
        opened vocabulary-only (milliseconds). Both loads are single-threaded, so on two cores they overlap:
        llama-mtmd-cli does them one after the other.
        """
        params = self._llama_cpp.llama_model_default_params()
        params.vocab_only = True
        vocab_model = self._llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), params)
        if vocab_model:  # else Llama() reports what is wrong with the file
            self._vocab_model = vocab_model
            self._start_loading(vocab_model)

    def preload_vision(self) -> None:
        """Start loading the vision model in the background; _vision waits for it.

        Loading is a single-threaded copy of the mmproj into memory (0.3-1 s for CLIP ViT-L at f16), so it
        runs beside the LLM's pass over the text before the image. On this project's 2-core CPU that took
        the two from 0.8-1.6 s one after the other to 0.7 s together.
        """
        if self._mctx is None and self._loading is None:
            self._start_loading(self.llama.model)

    def _start_loading(self, text_model) -> None:
        def load() -> None:
            try:
                self._load_vision(text_model)
            except BaseException as e:  # handed to the main thread by _vision
                self._load_error = e

        self._loading = threading.Thread(target=load, name="llava-vision-load", daemon=True)
        self._loading.start()

    def _load_vision(self, text_model=None) -> None:
        params = self._mtmd.mtmd_context_params_default()
        params.use_gpu = self.vision_offload
        params.n_threads = self._threads
        params.print_timings = self._verbose
        params.warmup = False
        # clip.cpp's flash attention accumulates in f32, so it costs no accuracy (features at the same
        # cosine to transformers) and encodes 20% faster on this project's CPU; llama-mtmd-cli turns it on too.
        params.flash_attn_type = self._llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        text_model = text_model or self.llama.model
        mctx = self._mtmd.mtmd_init_from_file(str(self._mmproj_to_load).encode(), text_model, params)
        if not mctx:
            raise ModelError(f"llama.cpp could not load mmproj {self.mmproj_path}: {backend.last_error()}")
        self._mctx = mctx

    # -- lifecycle -------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_loading", None) is not None:  # the vision model must not outlive the LLM it uses
            self._loading.join()
            self._loading = None
        if getattr(self, "_batch", None) is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_mctx", None):
            self._mtmd.mtmd_free(self._mctx)
            self._mctx = None
        if getattr(self, "_vocab_model", None):  # after the vision model, which holds its vocabulary
            self._llama_cpp.llama_model_free(self._vocab_model)
            self._vocab_model = None
        if getattr(self, "llama", None) is not None:
            self.llama.close()
            self.llama = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    def reset(self) -> None:
        """Forget the conversation: clear the KV cache."""
        self.llama.reset()
        self.llama._ctx.kv_cache_clear()
        self.n_past = 0
        self._text_prefix = None

    def start_with(self, text: str) -> int:
        """Make the context hold exactly `text` from its start; returns its tokens.

        When the context already opens with that text (the same system prompt for the next image of a
        batch), everything after it is dropped instead of evaluating the text again.
        """
        if self._text_prefix is not None and self._text_prefix[0] == text and self.n_past >= self._text_prefix[1]:
            self.truncate(self._text_prefix[1])
        else:
            self.reset()
            self.feed(text)
            self._text_prefix = (text, self.n_past)
        return self.n_past

    # -- sequence state: the KV cache of one conversation, as bytes --------------------------------------

    def save_state(self, seq: int = 0) -> memoryview:
        """Sequence seq's KV cache as llama.cpp serialises it from a one-stream cache, whatever this one is:
        a state saved by a batch loads into a lone conversation, and into a batch of another size."""
        ctx = self.llama.ctx
        size = self._llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = self._llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
        if written == 0:
            raise BackendError("llama.cpp could not save the context state")
        return as_one_stream(memoryview(buf).cast("B")[:written], self.n_seq)

    def load_state(self, data: bytes, n_past: int, text_prefix: tuple[str, int] | None = None) -> bool:
        """Replace the context with a saved one holding n_past positions; False if llama.cpp refuses it."""
        self.reset()
        if not self._set_seq_state(0, data):
            self.reset()
            return False
        self.llama.n_tokens = self.n_past = n_past
        self._text_prefix = text_prefix
        return True

    def _set_seq_state(self, seq: int, data: bytes) -> bool:
        data = as_streams(data, self.n_seq)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return self._llama_cpp.llama_state_seq_set_data(self.llama.ctx, buf, len(data), seq) != 0

    # -- images ----------------------------------------------------------------------------------------

    def prepare(self, img: Image.Image) -> Image.Image:
        """LLaVA's preprocessing at this mmproj's input size, as the checkpoint was trained."""
        return preprocess(img, self.image_size, self.image_mode)

    def _bitmap(self, img: Image.Image):
        rgb = np.ascontiguousarray(np.asarray(self.prepare(img), dtype=np.uint8))
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = self._mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], buf)
        if not bitmap:
            raise BackendError("llama.cpp could not take the image")
        return bitmap

    def _tokenize(self, text: str, images: list[Image.Image], at_start: bool | None = None):
        """mtmd chunks for prompt text in which each IMAGE stands for one of `images`, in order.

        at_start: the text opens a conversation (BOS first); by default, when the context is empty.
        """
        if text.count(IMAGE) != len(images):
            raise InputError(f"the prompt marks {text.count(IMAGE)} images but {len(images)} were given")
        bitmaps = [self._bitmap(img) for img in images]
        chunks = self._mtmd.mtmd_input_chunks_init()
        try:
            encoded = text.replace(IMAGE, self._marker).encode()
            inp = self._mtmd.mtmd_input_text()
            inp.text = encoded
            inp.text_len = len(encoded)
            inp.add_special = self.n_past == 0 if at_start is None else at_start  # BOS only at the very start
            inp.parse_special = True  # "</s>" between turns is the EOS token, as in training
            array = (self._mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = self._mtmd.mtmd_tokenize(self._vision, chunks, ctypes.byref(inp), array, len(bitmaps))
            if rc != 0:
                self._mtmd.mtmd_input_chunks_free(chunks)
                raise BackendError(f"llama.cpp could not tokenize the prompt (code {rc}): {backend.last_error()}")
            return chunks
        finally:
            for bitmap in bitmaps:
                self._mtmd.mtmd_bitmap_free(bitmap)

    def _chunks(self, chunks):
        mtmd = self._mtmd
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                yield chunk, [ptr[j] for j in range(n.value)]
            else:
                yield chunk, None

    def image_embeddings(self, img: Image.Image) -> np.ndarray:
        """The projector's output for one image: [n_image_tokens, n_embd], what the LLM receives."""
        chunks = self._tokenize(IMAGE, [img])
        try:
            for chunk, tokens in self._chunks(chunks):
                if tokens is None:
                    if self._mtmd.mtmd_encode_chunk(self._vision, chunk) != 0:
                        raise BackendError(f"llama.cpp failed to encode the image: {backend.last_error()}")
                    n = self._mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    embd = self._mtmd.mtmd_get_output_embd(self._vision)
                    return np.ctypeslib.as_array(embd, shape=(n * self.llama.n_embd(),)).reshape(n, -1).copy()
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)
        raise BackendError("llama.cpp produced no image chunk")

    # -- prompt and generation -------------------------------------------------------------------------

    def tokens_of(self, text: str, at_start: bool | None = None) -> list[int]:
        """Text tokens exactly as feed() would produce them for text without images at this position.

        What mtmd_tokenize makes of text without a marker (tools/mtmd/mtmd.cpp, mtmd_tokenizer): the text
        tokenized with special tokens parsed, then BOS before and EOS after it where the vocabulary asks
        for them and the text opens the context. Done here, so that text needs no vision model loaded.
        """
        if IMAGE in text:
            raise InputError(f"the prompt marks {text.count(IMAGE)} images but 0 were given")
        tokens = self.llama.tokenize(text.encode(), add_bos=False, special=True)
        if self.n_past == 0 if at_start is None else at_start:
            vocab = self.llama._model.vocab
            if self._llama_cpp.llama_vocab_get_add_bos(vocab):
                tokens.insert(0, self.llama.token_bos())
            if self._llama_cpp.llama_vocab_get_add_eos(vocab):
                tokens.append(self.llama.token_eos())
        return tokens

    def feed(self, text: str, images: list[Image.Image] = (), embeddings: list[np.ndarray | None] | None = None) -> int:
        """Evaluate prompt text (IMAGE marks each image) after what the context holds; returns its tokens.

        `embeddings`, where given for an image, are its image_embeddings() computed before: the vision
        encoder is skipped for it. Interrupted (Ctrl-C), it leaves the context as it was before the call.
        """
        start = self.n_past
        precomputed = iter(embeddings or [])
        try:
            with _deferred_ctrl_c():
                if not images:
                    tokens = self.tokens_of(text)
                    self._check_room(len(tokens))
                    self._eval_tokens(tokens)
                    return len(tokens)
                chunks = self._tokenize(text, list(images))
                try:
                    needed = self._mtmd.mtmd_helper_get_n_pos(chunks)
                    self._check_room(needed)
                    for chunk, tokens in self._chunks(chunks):
                        if tokens is not None:
                            self._eval_tokens(tokens)
                        else:
                            self._eval_image_chunk(chunk, next(precomputed, None))
                    return needed
                finally:
                    self._mtmd.mtmd_input_chunks_free(chunks)
        except KeyboardInterrupt:
            self.truncate(start)
            raise

    def _check_room(self, needed: int) -> None:
        if self.n_past + needed > self.n_ctx:
            raise BackendError(
                f"the prompt needs {self.n_past + needed} tokens but the context holds {self.n_ctx}; "
                "shorten it or raise --ctx-size"
            )

    def truncate(self, n_past: int) -> None:
        """Drop everything after the first n_past positions from the context."""
        self.llama._ctx.kv_cache_seq_rm(-1, n_past, -1)
        self.llama.n_tokens = self.n_past = n_past
        if self._text_prefix is not None and n_past < self._text_prefix[1]:
            self._text_prefix = None

    def _eval_tokens(self, tokens: list[int]) -> None:
        if not tokens:
            return
        try:
            self.llama.eval(tokens)
        except RuntimeError as e:
            raise BackendError(f"llama.cpp failed to evaluate the prompt: {e}") from None
        self.n_past = self.llama.n_tokens

    def _eval_image_chunk(self, chunk, embd: np.ndarray | None = None) -> None:
        self.n_past = self.llama.n_tokens = self._decode_image(chunk, embd, 0, self.n_past)

    def _decode_image(self, chunk, embd: np.ndarray | None, seq: int, pos: int) -> int:
        """The LLM's pass over one image chunk in sequence seq from position pos; returns the next position."""
        new_n_past = self._llama_cpp.llama_pos(0)
        n_tokens = self._mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if embd is not None and embd.shape == (n_tokens, self.llama.n_embd()):
            # What mtmd_helper_eval_chunk_single does after encoding, so the result is the same.
            embd = np.ascontiguousarray(embd, dtype=np.float32)
            rc = self._mtmd.mtmd_helper_decode_image_chunk(
                self._vision, self.llama.ctx, chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                pos, seq, self.llama.n_batch, ctypes.byref(new_n_past), self._mtmd.mtmd_helper_post_decode_callback(), None,
            )
        else:
            rc = self._mtmd.mtmd_helper_eval_chunk_single(
                self._vision, self.llama.ctx, chunk, pos, seq, self.llama.n_batch, False, ctypes.byref(new_n_past)
            )
        if rc != 0:
            raise BackendError(f"llama.cpp failed to evaluate the image (code {rc}): {backend.last_error()}")
        return new_n_past.value

    # -- several conversations side by side: one llama.cpp sequence each -------------------------------

    def use_sequences(self, n_seq: int, n_ctx_seq: int) -> None:
        """Rebuild the context to hold n_seq conversations of n_ctx_seq positions each.

        Each sequence gets a KV stream of its own (llama.cpp's non-unified cache), so one conversation's
        attention never reads another's positions. The single-conversation methods above are not for
        use afterwards.
        """
        from llama_cpp._internals import LlamaContext

        params = self.llama.context_params
        params.n_seq_max, params.n_ctx, params.kv_unified = n_seq, n_seq * n_ctx_seq, False
        self.llama._ctx.close()  # free the old KV cache before allocating the new one
        try:
            self.llama._ctx = LlamaContext(model=self.llama._model, params=params, verbose=self.llama.verbose)
        except ValueError:
            raise ModelError(f"llama.cpp could not make a context for {n_seq} answers: {backend.last_error()}") from None
        self.n_seq, self.n_ctx_seq = n_seq, self._llama_cpp.llama_n_ctx_seq(self.llama.ctx)
        self._batch = self._llama_cpp.llama_batch_init(self.llama.n_batch, 0, 1)
        self.n_past, self._text_prefix = 0, None

    def image_token_count(self) -> int:
        """Positions one image takes in the LLM's context."""
        chunks = self._tokenize(IMAGE, [Image.new("RGB", (self.image_size, self.image_size))])
        try:
            return sum(self._mtmd.mtmd_input_chunk_get_n_tokens(c) for c, tokens in self._chunks(chunks) if tokens is None)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    def seq_clear(self, seq: int) -> None:
        self._llama_cpp.llama_memory_seq_rm(self.llama._ctx.memory, seq, -1, -1)

    def seq_restore(self, seq: int, state: bytes) -> bool:
        """Make sequence seq hold a saved state (save_state); False if llama.cpp refuses it."""
        self.seq_clear(seq)
        if self._set_seq_state(seq, state):
            return True
        self.seq_clear(seq)
        return False

    def seq_feed_image(self, seq: int, pos: int, img: Image.Image, embd: np.ndarray | None = None) -> int:
        """The image (or its precomputed embeddings) into sequence seq at pos; returns the next position."""
        chunks = self._tokenize(IMAGE, [img], at_start=False)
        try:
            with _deferred_ctrl_c():
                for chunk, tokens in self._chunks(chunks):
                    if tokens is None:
                        pos = self._decode_image(chunk, embd, seq, pos)
            return pos
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    def seq_decode(self, entries: list[tuple[int, int, list[int]]]) -> list[int]:
        """Evaluate tokens in several sequences at once: entries of (sequence, first position, tokens).

        Returns, for each entry, the index its last token's logits have for sample(). Every last token
        goes into the final llama_decode, whose logits are the ones kept.
        """
        items = [(seq, pos + i, tok, False) for seq, pos, toks in entries for i, tok in enumerate(toks[:-1])]
        items += [(seq, pos + len(toks) - 1, toks[-1], True) for seq, pos, toks in entries]
        b, n_batch = self._batch, self.llama.n_batch
        for start in range(0, len(items), n_batch):
            part = items[start : start + n_batch]
            for i, (seq, pos, tok, keep) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, keep
                b.seq_id[i][0] = seq
            b.n_tokens = len(part)
            with _deferred_ctrl_c():
                rc = self._llama_cpp.llama_decode(self.llama.ctx, b)
            if rc != 0:
                raise BackendError(f"llama.cpp failed to decode a batch (code {rc}): {backend.last_error()}")
        first_kept = len(part) - len(entries)
        return [first_kept + i for i in range(len(entries))]

    def sampler(self, sampling: Sampling):
        """A fresh sampler: the same sampling and seed give the same answer."""
        return self._sampler(sampling)

    def sample(self, sampler, index: int) -> int:
        with _deferred_ctrl_c():
            return sampler.sample(self.llama._ctx, index)

    def is_end(self, token: int) -> bool:
        return token == self.llama.token_eos() or bool(self._llama_cpp.llama_vocab_is_eog(self.llama._model.vocab, token))

    def token_bytes(self, token: int) -> bytes:
        return self.llama.detokenize([token], special=False)

    def logits(self) -> np.ndarray:
        """Next-token logits after the last feed()."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llama.n_vocab(),)).copy()

    def _sampler(self, s: Sampling):
        from llama_cpp import llama_grammar
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if s.grammar is not None:
            try:
                grammar = llama_grammar.LlamaGrammar.from_json_schema(s.grammar, verbose=False)
            except Exception as e:
                raise InputError(f"--schema cannot be turned into a grammar: {e}") from None
            sampler.add_grammar(self.llama._model, grammar)
        if s.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_p(s.top_p, 1)
            sampler.add_temp(s.temperature)
            sampler.add_dist(s.seed & 0xFFFFFFFF)
        return sampler

    def generate(self, sampling: Sampling = Sampling(), usage: Usage | None = None, keep: bool = True) -> Iterator[str]:
        """Sample the answer token by token, yielding text as soon as it is valid UTF-8.

        keep: every sampled token but the end-of-sequence one is evaluated, so the context holds the answer
        and the conversation can go on. Without it the last token of an answer cut at max_tokens is not: an
        answer nothing follows saves a decoding step.
        """
        usage = usage if usage is not None else Usage()
        sampler = self._sampler(sampling)
        text = Utf8Stream()
        usage.stopped_by = "length"
        for step in range(sampling.max_tokens):
            token = self.sample(sampler, -1)
            usage.token_ids.append(token)
            if self.is_end(token):
                usage.stopped_by = "eos"
                break
            usage.generated_tokens += 1
            piece = text.add(self.token_bytes(token))
            if piece:
                yield piece
            if self.n_past + 1 > self.n_ctx:
                usage.stopped_by = "context"
                break
            if not keep and step + 1 == sampling.max_tokens:
                break
            with _deferred_ctrl_c():
                self._eval_tokens([token])
        rest = text.rest()
        if rest:
            yield rest


class Utf8Stream:
    """Token bytes in, text out as soon as it is whole UTF-8 characters."""

    def __init__(self):
        self._pending = b""

    def add(self, data: bytes) -> str:
        self._pending += data
        text = _complete_utf8(self._pending)
        self._pending = self._pending[len(text.encode()) :]
        return text

    def rest(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


@contextlib.contextmanager
def _repack_threads(n: int):
    """backend/repack-threads.patch: llama.cpp repacks each large weight on n threads at load (upstream: one)."""
    before = os.environ.get(REPACK_THREADS_ENV)
    os.environ[REPACK_THREADS_ENV] = str(n)
    try:
        yield
    finally:
        if before is None:
            del os.environ[REPACK_THREADS_ENV]
        else:
            os.environ[REPACK_THREADS_ENV] = before


@contextlib.contextmanager
def _model_params(**fields):
    """Llama() builds its llama_model_params from llama_model_default_params() and takes no argument for
    some of their fields (use_extra_bufts); this sets them there for the calls inside the block."""
    from llama_cpp import llama_cpp as raw

    default = raw.llama_model_default_params

    def with_fields():
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    raw.llama_model_default_params = with_fields
    try:
        yield
    finally:
        raw.llama_model_default_params = default


@contextlib.contextmanager
def _deferred_ctrl_c():
    """Hold Ctrl-C until llama.cpp returns, then raise KeyboardInterrupt here.

    llama.cpp calls back into Python to log while it decodes; a KeyboardInterrupt raised inside such a
    ctypes callback is printed and dropped, so Ctrl-C would be lost. The handler only takes note.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _complete_utf8(data: bytes) -> str:
    """The longest prefix of data that is whole UTF-8 characters."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def _check_pair(text_info, proj_info) -> None:
    if text_info.architecture == "clip":
        raise ModelError(f"model {text_info.path} is an mmproj (vision) file; pass it as --mmproj")
    if proj_info.architecture != "clip":
        raise ModelError(
            f"mmproj {proj_info.path} is a text model ({proj_info.architecture or 'unknown'}), not an mmproj"
        )
    want, have = text_embedding_length(text_info), mmproj_output_length(proj_info)
    if want != have:
        raise ModelError(
            f"mmproj {proj_info.path.name} makes {have}-wide image features but model {text_info.path.name} "
            f"takes {want}: they are not a pair"
        )
