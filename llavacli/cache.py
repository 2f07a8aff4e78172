"""A cache of image work shared by all `llava` processes: image embeddings and the context after an image.

Two kinds of entries, each one file under `cache_dir()/entries/`:
- `emb`: an image's projected embeddings (the vision encoder's work), keyed by the image bytes, the mmproj
  file and the preprocessing;
- `state`: llama.cpp's KV cache after the system prompt and the image (the LLM's work on the shared
  prefix), keyed as `emb` plus the text model, the prefix text (template and system prompt) and the
  settings that change its numbers.

Each file is a small header (magic, payload length, payload sha256) and the payload, written to a temporary
file and renamed into place, so a reader sees a whole entry or none; a file whose header does not match
its payload is removed and counts as a miss. A hit touches the file's mtime; when the total exceeds the
cap (LLAVA_CACHE_MAX, e.g. 2G, 500M, 0 to disable), the least recently used entries go first. Any
filesystem problem warns once and leaves the cache off for the rest of the process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from llavacli import backend

MAGIC = b"LLVCACH1"
HEADER = struct.Struct("<8sQ32s")  # magic, payload length, sha256 of the payload
DEFAULT_MAX = 2 * 1024**3
MAX_ENV = "LLAVA_CACHE_MAX"
KINDS = ("emb", "state")
_STALE_TEMP_SECONDS = 3600  # a temporary file this old belongs to a writer that died


def parse_size(text: str) -> int:
    """'2G', '500M', '64k', '1234' -> bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    value = float(number)
    if value < 0:
        raise ValueError(text)
    return int(value * scale)


def _warn(message: str) -> None:
    print(f"llava: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class CacheInfo:
    path: Path
    entries: dict[str, int]  # kind -> count
    size: int
    cap: int


class Cache:
    def __init__(self, root: Path | None = None, max_bytes: int | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else backend.cache_dir() / "entries"
        if max_bytes is None:
            max_bytes = DEFAULT_MAX
            if os.environ.get(MAX_ENV):
                try:
                    max_bytes = parse_size(os.environ[MAX_ENV])
                except ValueError:
                    _warn(f"{MAX_ENV}={os.environ[MAX_ENV]!r} is not a size like 2G or 500M; using 2G")
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0
        self._warned = False

    def _fail(self, what: str, err: OSError) -> None:
        if not self._warned:
            _warn(f"image cache off: cannot {what} {self.root} ({err.strerror or err})")
            self._warned = True
        self.enabled = False

    def _path(self, kind: str, key: str) -> Path:
        return self.root / key[:2] / f"{key}.{kind}"

    # -- raw entries -----------------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> bytes | None:
        if not self.enabled:
            return None
        path = self._path(kind, key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._fail("read", e)
            return None
        payload = _unwrap(data)
        if payload is None:  # truncated or damaged: drop it, the caller recomputes
            with _quiet():
                path.unlink()
            return None
        with _quiet():
            os.utime(path)  # least recently used is judged by mtime
        return payload

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry is there (not whether it is intact: get() checks that)."""
        return self.enabled and self._path(kind, key).is_file()

    def put(self, kind: str, key: str, *parts: bytes) -> None:
        """Store the payload made of parts, written one after the other (a state is tens of MB: no joining)."""
        if not self.enabled:
            return
        digest, length = hashlib.sha256(), 0
        for part in parts:
            digest.update(part)
            length += len(part)
        header = HEADER.pack(MAGIC, length, digest.digest())
        if len(header) + length > self.max_bytes:
            return
        path = self._path(kind, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    for part in (header, *parts):
                        f.write(part)
                os.replace(tmp, path)  # atomic: readers see the old entry, the new one, or none
            except BaseException:
                with _quiet():
                    os.unlink(tmp)
                raise
        except OSError as e:
            self._fail("write to", e)
            return
        self.evict()

    # -- housekeeping ----------------------------------------------------------------------------------

    def _files(self):
        """(path, size, mtime) of every entry; stale temporary files are removed on the way."""
        now = time.time()
        out = []
        if not self.root.is_dir():
            return out
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                try:
                    st = path.stat()
                except OSError:
                    continue  # removed by another process meanwhile
                if path.name.endswith(".tmp"):
                    if now - st.st_mtime > _STALE_TEMP_SECONDS:
                        with _quiet():
                            path.unlink()
                    continue
                out.append((path, st.st_size, st.st_mtime))
        return out

    def evict(self) -> None:
        """Remove least recently used entries until the total fits the cap."""
        try:
            files = sorted(self._files(), key=lambda f: f[2])
        except OSError:
            return
        total = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if total <= self.max_bytes:
                break
            with _quiet():
                path.unlink()
            total -= size

    def info(self) -> CacheInfo:
        files = self._files()
        entries = {kind: 0 for kind in KINDS}
        for path, _, _ in files:
            kind = path.suffix.lstrip(".")
            entries[kind] = entries.get(kind, 0) + 1
        return CacheInfo(self.root, entries, sum(size for _, size, _ in files), self.max_bytes)

    def clear(self) -> int:
        """Remove every entry; returns how many."""
        files = self._files()
        for path, _, _ in files:
            with _quiet():
                path.unlink()
        return len(files)

    # -- typed entries ---------------------------------------------------------------------------------

    def get_embeddings(self, key: str) -> np.ndarray | None:
        data = self.get("emb", key)
        if data is None:
            return None
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            return None

    def put_embeddings(self, key: str, embd: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(embd, dtype=np.float32), allow_pickle=False)
        self.put("emb", key, buf.getvalue())

    def get_state(self, key: str) -> tuple[memoryview, int, int] | None:
        """(llama.cpp state, positions it holds, positions of the text before the image)."""
        data = self.get("state", key)
        if data is None or len(data) < 16:
            return None
        n_past, n_text = struct.unpack_from("<qq", data)
        return memoryview(data)[16:], n_past, n_text

    def put_state(self, key: str, state: bytes, n_past: int, n_text: int) -> None:
        if len(state) > self.max_bytes // 4:  # a state that would push most other entries out does not pay
            return
        self.put("state", key, struct.pack("<qq", n_past, n_text), state)


def _unwrap(data: bytes) -> bytes | None:
    if len(data) < HEADER.size:
        return None
    magic, length, digest = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    if magic != MAGIC or length != len(payload) or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


class _quiet:
    """Ignore filesystem errors for best-effort steps (another process may have removed the file)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


# -- keys ----------------------------------------------------------------------------------------------


def file_fingerprint(path: Path) -> dict:
    """A file as the cache knows it: a rewritten or replaced model changes size or mtime."""
    path = Path(path).resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def embeddings_key(engine, image_sha256: str) -> str:
    return _digest(
        {
            "image": image_sha256,
            "mmproj": file_fingerprint(engine.mmproj_path),
            "preprocess": [engine.image_size, engine.image_mode],
            "vision_gpu": engine.vision_offload,
            "vision_flash_attn": True,  # Engine._load_vision; entries encoded without it are recomputed
        }
    )


def state_key(engine, image_sha256: str, template_name: str, prefix_text: str) -> str:
    return _digest(
        {
            "embeddings": embeddings_key(engine, image_sha256),
            "model": file_fingerprint(engine.model_path),
            "template": template_name,
            "prefix": prefix_text,  # the system prompt and the template's text before the image
            "n_batch": engine.n_batch,
            "gpu_layers": engine.n_gpu_layers,
            "flash_attn": engine.flash_attn,  # llama.cpp lays the V cache out differently with it
            "repack": engine.repack,  # other kernels, other rounding
            "llama_cpp": backend_version(),
        }
    )


def backend_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "")


def open_cache(enabled: bool = True) -> Cache:
    return Cache(enabled=enabled)


# -- `llava cache` ---------------------------------------------------------------------------------------

cache_app = typer.Typer(name="cache", no_args_is_help=True, add_completion=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache_app.command("info")
def info_command() -> None:
    """Where the cache is, what it holds, and its cap (LLAVA_CACHE_MAX)."""
    from llavacli.errors import LlavaError

    cache = Cache()
    try:
        info = cache.info()
    except OSError as e:
        raise LlavaError(f"cannot read the cache at {cache.root}: {e.strerror or e}") from None
    print(f"path     {info.path}")
    print(f"entries  {info.entries.get('emb', 0)} image embeddings, {info.entries.get('state', 0)} prompt states")
    print(f"size     {_size(info.size)} of {_size(info.cap)} ({MAX_ENV})")


@cache_app.command("clear")
def clear_command() -> None:
    """Remove every cached entry."""
    from llavacli.errors import LlavaError

    cache = Cache()
    try:
        n = cache.clear()
    except OSError as e:
        raise LlavaError(f"cannot clear the cache at {cache.root}: {e.strerror or e}") from None
    print(f"removed {n} entries from {cache.root}")
