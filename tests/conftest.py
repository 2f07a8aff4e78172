"""Shared fixtures: tiny LLaVA checkpoints, their GGUF conversions, and the installed `llava` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import tinymodels  # noqa: E402

LLAVA = Path(sys.executable).parent / "llava"


def run_llava(*args, input: bytes | str | None = None, env: dict | None = None, timeout: float = 300, cwd=None):
    """The installed `llava` command as a user runs it; returns the CompletedProcess (text mode)."""
    full_env = os.environ | {"COLUMNS": "120"} | (env or {})
    return subprocess.run(
        [str(LLAVA), *map(str, args)],
        input=input,
        capture_output=True,
        text=not isinstance(input, bytes),
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Keep the tests' caches (conformance verdict, model hub, chat history) out of the user's home."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("LLAVA_CACHE", "HF_HOME", "XDG_STATE_HOME")}
    os.environ["LLAVA_CACHE"] = str(home / "llava-cache")
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ["XDG_STATE_HOME"] = str(home / "state")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Checkpoints:
    """Tiny checkpoints built on first use, each converted once per outtype."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[str, tuple[Path, Path | None]] = {}
        self._converted: dict[tuple[str, str], tuple[Path, Path]] = {}

    def source(self, kind: str) -> tuple[Path, Path | None]:
        """(checkpoint dir, vision tower dir or None) for kind in hf15, orig15, orig1."""
        if kind not in self._dirs:
            if kind == "hf15":
                self._dirs[kind] = (tinymodels.make_llava_hf(self.root / "hf15"), None)
            elif kind == "orig15":
                tower = tinymodels.make_clip_tower(self.root / "tower15")
                self._dirs[kind] = (tinymodels.make_llava_original(self.root / "orig15", tower), tower)
            elif kind == "orig1":
                tower = tinymodels.make_clip_tower(self.root / "tower1", tinymodels.V1)
                ckpt = tinymodels.make_llava_original(self.root / "orig1", tower, tinymodels.V1, bin_shards=False)
                self._dirs[kind] = (ckpt, tower)
            else:
                raise KeyError(kind)
        return self._dirs[kind]

    def gguf(self, kind: str, outtype: str = "f32") -> tuple[Path, Path]:
        """Converted through the installed `llava convert`, as a user would."""
        key = (kind, outtype)
        if key not in self._converted:
            src, _ = self.source(kind)
            out = self.root / f"gguf-{kind}-{outtype}"
            proc = run_llava("convert", src, out, "--outtype", outtype)
            assert proc.returncode == 0, proc.stderr
            self._converted[key] = (out / f"{src.name}.gguf", out / f"{src.name}.mmproj.gguf")
        return self._converted[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Real image files: a square photo-like one and a wide one that LLaVA-1.5 pads."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    out = {}
    for name, (h, w) in {"square": (336, 336), "wide": (240, 400), "tall": (300, 180)}.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h))], -1)
        noise = rng.normal(0, 25, (h, w, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        out[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(out[name])
    return out
