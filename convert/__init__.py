"""LLaVA checkpoints (llava-hf or original layout) to a GGUF pair that llama.cpp runs.

    convert(src, out_dir, outtype="f16") -> (text_gguf, mmproj_gguf)

Both files are written under temporary names and renamed only when complete; an existing file is never
replaced without force=True, and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import LlamaFileType

from llavacli.errors import ConvertError


@dataclass(frozen=True)
class OutType:
    float_type: np.dtype  # what the writer stores weight matrices as
    file_type: LlamaFileType  # general.file_type of the written text model
    quantize_to: LlamaFileType | None = None  # then quantized by llama.cpp to this


OUTTYPES = {
    "f32": OutType(np.dtype(np.float32), LlamaFileType.ALL_F32),
    "f16": OutType(np.dtype(np.float16), LlamaFileType.MOSTLY_F16),
    "q8_0": OutType(np.dtype(np.float16), LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": OutType(np.dtype(np.float16), LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_Q4_K_M),
}


@dataclass(frozen=True)
class Outputs:
    text: Path
    mmproj: Path


def output_paths(out_dir: Path, name: str) -> Outputs:
    return Outputs(out_dir / f"{name}.gguf", out_dir / f"{name}.mmproj.gguf")


def resolve_source(src: str) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id fetched into the hub cache."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        return _fetch(src)
    raise ConvertError(f"{src}: no such directory, and not a Hugging Face repo id (owner/name)")


def _fetch(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ConvertError(f"cannot fetch {repo_id} from the Hugging Face Hub: {str(e).splitlines()[0]}") from None


def convert(
    src: str,
    out_dir: Path,
    outtype: str = "f16",
    *,
    vision_tower: Path | None = None,
    name: str | None = None,
    force: bool = False,
    progress=None,
) -> Outputs:
    from convert.checkpoint import load_checkpoint
    from convert.mmproj import write_mmproj
    from convert.text import write_text_model

    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown --outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    kind = OUTTYPES[outtype]
    directory = resolve_source(src)
    ckpt = load_checkpoint(directory, vision_tower=vision_tower, fetch=_fetch)
    # A hub snapshot's folder is named by its commit; the repo's own name says more.
    ckpt.name = name or (ckpt.name if Path(src).expanduser().exists() else src.split("/")[-1])
    outputs = output_paths(out_dir, ckpt.name)
    for path in (outputs.text, outputs.mmproj):
        if path.exists() and not force:
            raise ConvertError(f"{path} exists; pass --force to replace it")

    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = [p.with_name(f".{p.name}.partial-{os.getpid()}") for p in (outputs.text, outputs.mmproj)]
    f16_text = partial[0].with_name(partial[0].name + ".f16")
    try:
        if kind.quantize_to is None:
            write_text_model(ckpt, partial[0], kind.float_type, kind.file_type, progress)
        else:
            write_text_model(ckpt, f16_text, kind.float_type, kind.file_type, progress)
            quantize(f16_text, partial[0], kind.quantize_to, progress)
        # mmproj files stay float: llama_model_quantize does not take them.
        write_mmproj(ckpt, partial[1], kind.float_type, kind.file_type, progress)
        for tmp, final in zip(partial, (outputs.text, outputs.mmproj)):
            os.replace(tmp, final)
    except BaseException:
        for tmp in partial:
            tmp.unlink(missing_ok=True)
        if created_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    finally:
        f16_text.unlink(missing_ok=True)
    return outputs


def quantize(src: Path, dst: Path, file_type: LlamaFileType, progress=None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), quiet unless it fails."""
    import llama_cpp

    from llavacli.backend import quiet_llama_logs

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = os.cpu_count() or 1
    task = progress.add_task(f"quantizing to {file_type.name}", total=None) if progress else None
    with quiet_llama_logs():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if task is not None:
        progress.update(task, total=1, completed=1)
    if rc != 0:
        raise ConvertError(f"llama.cpp failed to quantize {src.name} to {file_type.name} (code {rc})")
