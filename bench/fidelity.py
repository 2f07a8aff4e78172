"""Fidelity of each --outtype against transformers, on a tiny random LLaVA-1.5 built here.

    .venv/bin/python bench/fidelity.py [--kind hf15|orig15|orig1] [--flash-attn auto|on|off]

Prints, per outtype: image-embedding cosine (mean/min) to LlavaForConditionalGeneration's features,
next-token logit cosine and argmax agreement, and how many of 16 greedy tokens match.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # ROOT first: bench/train.py would shadow the train package

import conftest  # noqa: E402
import reference  # noqa: E402
from llavacli.engine import Engine, Sampling, Usage  # noqa: E402
from llavacli.prompts import get_template  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="hf15", choices=["hf15", "orig15", "orig1"])
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                        help="flash attention in the LLM: on as `llava ask` runs; auto, the engine's default: on with a GPU")
    args = parser.parse_args()
    t = get_template("vicuna_v1")
    prompt = t.opening() + t.question("What shape is in the picture?", 1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = conftest.Checkpoints(Path(tmp))
        src, tower = ckpts.source(args.kind)
        ref = reference.load_llava_hf(src) if tower is None else reference.load_original(src, tower)
        img = Image.open(ROOT / "llavacli" / "data" / "conformance" / "image.png").resize((300, 200))
        want_feat, want_logits = ref.image_features(img), ref.next_logits(prompt, img)
        want_tokens = ref.greedy(prompt, img, 16)
        print(f"{'outtype':8} {'emb mean cos':>13} {'emb min cos':>12} {'logit cos':>11} {'argmax':>7} {'greedy 16':>9}")
        for outtype in ("f32", "f16", "q8_0", "q4_k_m"):
            with Engine(*ckpts.gguf(args.kind, outtype), n_ctx=2048, flash_attn={"on": True, "off": False}.get(args.flash_attn)) as engine:
                cos = reference.cosines(engine.image_embeddings(img), want_feat)
                engine.feed(prompt, [img])
                logits = engine.logits()[: len(want_logits)]
                usage = Usage()
                list(engine.generate(Sampling(max_tokens=16), usage))
            lcos = reference.cosines(logits, want_logits)[0]
            same = sum(a == b for a, b in zip(usage.token_ids, want_tokens))
            print(f"{outtype:8} {cos.mean():13.7f} {cos.min():12.7f} {lcos:11.7f} {str(logits.argmax() == want_logits.argmax()):>7} {same:>6}/16")


if __name__ == "__main__":
    main()
