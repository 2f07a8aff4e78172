"""Builds the stand-in demo model: a tiny random LLaVA-1.5, converted to GGUF by `llava convert`.

    .venv/bin/python examples/tiny_demo.py OUT_DIR     # writes OUT_DIR/gguf/tiny-demo{,.mmproj}.gguf

`make demo` uses it only while the trained demo model is not shipped in llavacli/data/demo/: it shows
the whole path (checkpoint, conversion, llama.cpp with the fixed backend) working, not a useful answer.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tinymodels  # noqa: E402
from convert import convert  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    ckpt = tinymodels.make_llava_hf(out / "tiny-demo")
    convert(str(ckpt), out / "gguf", "f16", force=True)


if __name__ == "__main__":
    main()
