"""GGUF metadata both sides agree on: the keys the runtime reads, and reading a file's header.

Reading the header first lets the runtime refuse a damaged or mismatched pair with a clear message before
llama.cpp loads it (llama.cpp answers a truncated file with an abort or a bare NULL). The header is parsed
by llama.cpp's own GGUF reader (ggml's gguf_init_from_file, without the tensor data) through ctypes: it
takes under a millisecond where gguf-py's reader, which parses every token string into a numpy view,
took 0.14 s for the bench's pair, and the runtime need not import gguf-py (0.1 s more) at all. The
converter writes with gguf-py; tests/test_ggufmeta.py checks that the keys below are gguf-py's.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from llavacli.errors import ModelError

ARCHITECTURE_KEY = "general.architecture"
CLIP_HAS_LLAVA_PROJECTOR_KEY = "clip.has_llava_projector"
CLIP_BLOCK_COUNT_KEY = "clip.vision.block_count"
CLIP_IMAGE_SIZE_KEY = "clip.vision.image_size"
CLIP_PROJECTION_DIM_KEY = "clip.vision.projection_dim"
EMBEDDING_LENGTH_KEY = "{arch}.embedding_length"
# Keys of our own, in a namespace of our own: what the converter knew about the checkpoint.
TEMPLATE_KEY = "llavacli.template"  # text model: the conversation template it was trained with
IMAGE_MODE_KEY = "llavacli.image_mode"  # mmproj: images.PAD or images.CROP
# clip.cpp reads this (KEY_FEATURE_LAYERS in tools/mtmd/clip-impl.h); gguf-py has no constant for it.
FEATURE_LAYER_KEY = "clip.vision.feature_layer"


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    fields: dict

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


# -- ggml's GGUF reader (ggml/include/gguf.h) ----------------------------------------------------------

GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 8, 9
_SCALARS = {  # enum gguf_type -> (getter suffix, C type)
    0: ("u8", ctypes.c_uint8), 1: ("i8", ctypes.c_int8), 2: ("u16", ctypes.c_uint16), 3: ("i16", ctypes.c_int16),
    4: ("u32", ctypes.c_uint32), 5: ("i32", ctypes.c_int32), 6: ("f32", ctypes.c_float), 7: ("bool", ctypes.c_bool),
    10: ("u64", ctypes.c_uint64), 11: ("i64", ctypes.c_int64), 12: ("f64", ctypes.c_double),
}


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _gguf_functions():
    # The gguf_* functions live in libggml-base, which libllama links. Looking them up through libllama's
    # handle finds that very copy: pip installs the library's links as copies, and loading
    # libggml-base.so by path would map a second one whose logger llama_log_set never reaches.
    from llama_cpp.llama_cpp import _lib as lib

    ctx, i64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _InitParams], ctx),
        "gguf_free": ([ctx], None),
        "gguf_get_n_kv": ([ctx], i64),
        "gguf_get_key": ([ctx, i64], ctypes.c_char_p),
        "gguf_get_kv_type": ([ctx, i64], ctypes.c_int),
        "gguf_get_arr_type": ([ctx, i64], ctypes.c_int),
        "gguf_get_arr_n": ([ctx, i64], size),
        "gguf_get_arr_data": ([ctx, i64], ctypes.c_void_p),
        "gguf_get_val_str": ([ctx, i64], ctypes.c_char_p),
        "gguf_get_data_offset": ([ctx], size),
        "gguf_get_n_tensors": ([ctx], i64),
        "gguf_get_tensor_offset": ([ctx, i64], size),
        "gguf_get_tensor_size": ([ctx, i64], size),
        "gguf_get_tensor_name": ([ctx, i64], ctypes.c_char_p),
        **{f"gguf_get_val_{name}": ([ctx, i64], ctype) for name, ctype in _SCALARS.values()},
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _value(lib, ctx, i: int):
    kind = lib.gguf_get_kv_type(ctx, i)
    if kind == GGUF_TYPE_STRING:
        return lib.gguf_get_val_str(ctx, i).decode("utf-8", errors="replace")
    if kind in _SCALARS:
        return getattr(lib, f"gguf_get_val_{_SCALARS[kind][0]}")(ctx, i)
    if kind == GGUF_TYPE_ARRAY:
        item = _SCALARS.get(lib.gguf_get_arr_type(ctx, i))
        if item is None:
            return None  # token lists and other string arrays: large, and nothing here needs them
        n = lib.gguf_get_arr_n(ctx, i)
        return ctypes.cast(lib.gguf_get_arr_data(ctx, i), ctypes.POINTER(item[1]))[:n] if n else []
    return None


def read_gguf(path: Path, role: str = "model") -> GGUFInfo:
    """The header of a GGUF file, or a ModelError naming the file and what is wrong with it."""
    from llavacli.backend import last_error, quiet_llama_logs

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{role} {path}: no such file")
    if path.is_dir():
        raise ModelError(f"{role} {path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{role} {path}: not a GGUF file")
    lib = _gguf_functions()
    with quiet_llama_logs():
        ctx = lib.gguf_init_from_file(os.fsencode(path), _InitParams(True, None))
    if not ctx:
        raise ModelError(f"{role} {path}: damaged GGUF file ({last_error()})")
    try:
        fields = {lib.gguf_get_key(ctx, i).decode("utf-8", errors="replace"): _value(lib, ctx, i)
                  for i in range(lib.gguf_get_n_kv(ctx))}
        ends = [lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i)
                for i in range(lib.gguf_get_n_tensors(ctx))]
        expected = lib.gguf_get_data_offset(ctx) + max(ends) if ends else 0
        empty = next((lib.gguf_get_tensor_name(ctx, i).decode("utf-8", errors="replace")
                      for i in range(lib.gguf_get_n_tensors(ctx)) if lib.gguf_get_tensor_size(ctx, i) == 0), None)
    finally:
        lib.gguf_free(ctx)
    if empty:  # llama.cpp loads it, then aborts the process in the first matrix product
        raise ModelError(f"{role} {path}: tensor {empty} is empty (a dimension of 0); llama.cpp cannot run it")
    if path.stat().st_size < expected:
        raise ModelError(f"{role} {path}: truncated GGUF file ({path.stat().st_size} of {expected} bytes)")
    return GGUFInfo(path, fields.get(ARCHITECTURE_KEY, ""), fields)


def text_embedding_length(info: GGUFInfo) -> int:
    return int(info.get(EMBEDDING_LENGTH_KEY.format(arch=info.architecture), 0))


def mmproj_output_length(info: GGUFInfo) -> int:
    return int(info.get(CLIP_PROJECTION_DIM_KEY, 0))
