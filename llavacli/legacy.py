"""A cached copy of a legacy mmproj with clip.vision.feature_layer set, made with gguf-py's own copier."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from llavacli.ggufmeta import FEATURE_LAYER_KEY, GGUFInfo


def with_feature_layer(info: GGUFInfo, layer: int, directory: Path) -> Path:
    st = info.path.stat()
    key = hashlib.sha256(f"{info.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{layer}".encode()).hexdigest()[:16]
    target = directory / f"{info.path.stem}.{key}.gguf"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        reader = gguf.GGUFReader(info.path, "r")
        writer = gguf.GGUFWriter(tmp, info.architecture)
        new = {FEATURE_LAYER_KEY: MetadataDetails(gguf.GGUFValueType.ARRAY, [layer], sub_type=gguf.GGUFValueType.INT32)}
        copy_with_new_metadata(reader, writer, new, [])
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
