"""Regenerates llavacli/data/conformance/: the tiny model and reference features of the backend check.

    .venv/bin/python backend/make_conformance_fixture.py

A 56 px, 16-patch CLIP tower with random weights: small enough to ship (~100 KB) and to run in
milliseconds, and sensitive to both measured defects (CLS order, layer count). The reference features
come from transformers' LlavaForConditionalGeneration on the same weights and image.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import reference  # noqa: E402
import tinymodels  # noqa: E402
from convert import convert  # noqa: E402

SHAPE = tinymodels.Shape(
    image_size=56, patch_size=14, vision_hidden=32, vision_ff=80, vision_layers=3, vision_heads=2,
    text_hidden=32, text_ff=64, text_layers=1, text_heads=2, text_kv_heads=1,
)


def main() -> None:
    out = ROOT / "llavacli" / "data" / "conformance"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tinymodels.make_llava_hf(Path(tmp) / "tiny", SHAPE, seed=11)
        convert(str(ckpt), out, "f32", name="tiny", force=True)
        rng = np.random.default_rng(11)
        img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))  # non-square: padding too
        img.save(out / "image.png")
        features = reference.load_llava_hf(ckpt).image_features(Image.open(out / "image.png"))
        np.save(out / "reference.npy", features.astype(np.float32))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
