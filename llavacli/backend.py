"""The llama.cpp build underneath: its logs, what it can offload, and whether it computes LLaVA correctly.

Stock llama-cpp-python 0.3.36 puts CLIP's class embedding after the patches (llama.cpp issue 25814), which
shifts every position embedding: image features come out at cosine ~0.5 to the reference. `make install`
builds the library with backend/llava-cls-first.patch. Since a user may still run a stock build, the
engine checks conformance against a tiny shipped model once per library build, in a child process, and
says what it found.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llavacli.ggufmeta import CLIP_BLOCK_COUNT_KEY, CLIP_HAS_LLAVA_PROJECTOR_KEY, FEATURE_LAYER_KEY, GGUFInfo

PATCHED_SUFFIX = "+llava.clsfix"
FIX_HINT = (
    "install the fixed backend: from a checkout of llava-cli run `make install` "
    "(or `bash backend/build.sh $(which python)`; add CMAKE_ARGS=-DGGML_CUDA=on for CUDA)"
)
DATA = Path(__file__).parent / "data"
CONFORMANCE_DIR = DATA / "conformance"
CONFORMANCE_MIN_MEAN_COS = 0.9999  # the fixed build measures 0.9999998; a stock build about 0.5

_log_lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=200)
_verbose = False
_callback = None  # kept alive: llama.cpp holds a raw pointer to it


def cache_dir() -> Path:
    root = os.environ.get("LLAVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llava-cli"
    )
    return Path(root)


# -- logs ----------------------------------------------------------------------------------------------


def capture_logs(verbose: bool = False) -> None:
    """Route llama.cpp's, ggml's and mtmd's logs to us: kept for error messages, printed only if verbose."""
    global _callback, _verbose
    import llama_cpp
    from llama_cpp import mtmd_cpp

    _verbose = verbose
    if _callback is None:

        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, user_data) -> None:
            line = text.decode("utf-8", errors="replace")
            _log_lines.append((level, line))
            if _verbose:
                sys.stderr.write(line)

        _callback = _on_log
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def quiet_llama_logs():
    capture_logs(_verbose)
    yield


def last_error() -> str:
    """The last error (else warning) llama.cpp logged, on one line, for our own error messages."""
    for wanted in (4, 3):  # GGML_LOG_LEVEL_ERROR, then WARN (ggml.h)
        for level, line in reversed(_log_lines):
            if level == wanted and line.strip():
                return line.strip().splitlines()[0]
    return "no details logged (run with -v to see llama.cpp's log)"


# -- what the build can do -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildInfo:
    version: str
    patched: bool
    gpu_offload: bool
    library_dir: str
    system_info: str


def build_info() -> BuildInfo:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    return BuildInfo(
        version=llama_cpp.__version__,
        patched=llama_cpp.__version__.endswith(PATCHED_SUFFIX),
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        library_dir=str(lib_dir),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    )


def build_fingerprint() -> str:
    """Changes whenever the native libraries change: the key of the cached conformance verdict."""
    info = build_info()
    h = hashlib.sha256(info.version.encode())
    for lib in sorted(Path(info.library_dir).glob("*")):
        st = lib.stat()
        h.update(f"{lib.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# -- legacy mmproj files -------------------------------------------------------------------------------


def runnable_mmproj(info: GGUFInfo) -> Path:
    """The mmproj path to hand llama.cpp, fixing files from llama.cpp's legacy LLaVA converter.

    That converter stores one ViT layer fewer than the tower has and no feature layer, and clip.cpp then
    stops one layer early again. Setting clip.vision.feature_layer to the stored layer count makes it run
    every stored layer: the hidden state LLaVA uses. The fixed copy is made once and cached.
    """
    legacy = info.get(CLIP_HAS_LLAVA_PROJECTOR_KEY) and info.get(FEATURE_LAYER_KEY) is None
    if not legacy:
        return info.path
    from llavacli.legacy import with_feature_layer

    return with_feature_layer(info, int(info.get(CLIP_BLOCK_COUNT_KEY)), cache_dir() / "mmproj")


# -- conformance ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    conformant: bool
    mean_cos: float
    min_cos: float
    fingerprint: str
    detail: str = ""

    def describe(self) -> str:
        if self.detail:
            return f"unchecked: {self.detail}"
        if self.conformant:
            return f"conformant (LLaVA image features at mean cosine {self.mean_cos:.7f} to the reference)"
        return (
            f"NOT conformant: LLaVA image features at mean cosine {self.mean_cos:.3f} "
            f"(min {self.min_cos:.3f}) to the reference; answers about images will be wrong"
        )


def measure_conformance(directory: Path = CONFORMANCE_DIR, mmproj: Path | None = None) -> Verdict:
    """Encode the shipped test image with the shipped tiny model; compare with transformers' features."""
    import numpy as np
    from PIL import Image

    from llavacli.engine import Engine

    ref = np.load(directory / "reference.npy")
    mmproj = mmproj or directory / "tiny.mmproj.gguf"
    with Engine(directory / "tiny.gguf", mmproj, n_ctx=256, n_gpu_layers=0) as eng:
        got = eng.image_embeddings(Image.open(directory / "image.png"))
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    mean_cos, min_cos = float(cos.mean()), float(cos.min())
    return Verdict(mean_cos >= CONFORMANCE_MIN_MEAN_COS, mean_cos, min_cos, build_fingerprint())


SELF_CHECK = [sys.executable, "-m", "llavacli.backend"]  # prints measure_conformance()'s verdict as JSON
SELF_CHECK_TIMEOUT = 300


def measure_conformance_apart() -> Verdict:
    """measure_conformance() in a child process, so that a backend that crashes on it (as one CUDA build
    did inside llama_model_load_from_file) yields a verdict saying so instead of killing the command."""
    try:
        proc = subprocess.run(SELF_CHECK, capture_output=True, text=True, timeout=SELF_CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        return _unchecked(f"the LLaVA self-check took over {SELF_CHECK_TIMEOUT} s")
    if proc.returncode == 0:
        with contextlib.suppress(ValueError, TypeError, IndexError):
            return Verdict(**json.loads(proc.stdout.strip().splitlines()[-1]))
    if proc.returncode < 0:
        how = f"died of {signal.Signals(-proc.returncode).name}"
    else:
        last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        how = f"failed (exit status {proc.returncode}: {last[0][:200]})"
    return _unchecked(f"the LLaVA self-check of this llama.cpp build {how}; image answers are unverified")


def _unchecked(detail: str) -> Verdict:
    return Verdict(False, 0.0, 0.0, build_fingerprint(), detail)


def conformance(use_cache: bool = True) -> Verdict:
    """The backend's verdict, measured once per library build (in a child process) and remembered."""
    path = cache_dir() / "conformance.json"
    fingerprint = build_fingerprint()
    if use_cache:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            cached = json.loads(path.read_text())
            if cached["fingerprint"] == fingerprint:
                return Verdict(**cached)
    verdict = measure_conformance_apart()
    with contextlib.suppress(OSError):  # an unwritable cache only costs measuring again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(verdict)))
        os.replace(tmp, path)
    return verdict


if __name__ == "__main__":  # SELF_CHECK: the verdict on stdout's last line
    print(json.dumps(asdict(measure_conformance())))
