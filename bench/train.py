"""Training throughput and peak memory of a config, on random models of a chosen size and synthetic data.

    python bench/train.py --size 7b llava-1.5-7b-finetune-lora engine=ddp per_device_batch_size=4
    torchrun --nproc_per_node 8 bench/train.py --size 7b llava-1.5-7b-finetune
    python bench/train.py --size tiny --steps 6 llava-1.5-7b-pretrain engine=ddp bf16=false global_batch_size=8 per_device_batch_size=4

The config runs as it is (engine, batch sizes, precision, LoRA, checkpointing), with its models swapped for
random ones of the chosen shape (LLaMA-2 7B/13B or a 1B, under CLIP ViT-L/14-336; `tiny` is the tests'
model) and its data for synthetic image + question + answer samples of about --words words each. The random
models are written once under bench/out/models/ (7B: 13 GB in bf16). Prints one JSON line per process: median
samples/s over the steps after the first two, and peak GPU memory (torch.cuda.max_memory_allocated) and peak
host memory (max RSS). Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
OUT = REPO / "bench" / "out"

# (hidden, layers, heads, kv heads, intermediate, vocab) of the LLM; the tower is CLIP ViT-L/14-336 unless tiny.
SIZES = {
    "1b": (2048, 22, 32, 4, 5632, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
}
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)


def _build_models(size: str, root: Path) -> tuple[Path, Path]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    import train_kit
    from tinymodels import train_sentencepiece

    llm, clip = root / "llm", root / "clip"
    if size == "tiny":
        return train_kit.base_models(root)
    hidden, layers, heads, kv, ff, vocab = SIZES[size]
    train_sentencepiece(root / "spm")  # a small real tokenizer; the embedding keeps the model's full vocabulary
    tok = LlamaTokenizer.from_pretrained(root / "spm", add_bos_token=True, legacy=False)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=ff, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    LlamaForCausalLM(config).save_pretrained(llm)
    tok.save_pretrained(llm)
    CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336, hidden_act="quick_gelu")).save_pretrained(clip)
    torch.set_default_dtype(torch.float32)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(clip)
    return llm, clip


def _models(size: str, rank: int) -> tuple[Path, Path]:
    root = OUT / "models" / size
    done = root / ".done"
    if rank == 0 and not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        _build_models(size, root)
        done.touch()
    while not done.exists():  # the other processes wait for process 0 to write them
        time.sleep(2)
    return root / "llm", root / "clip"


def _data(n: int, words: int, image_size: int, root: Path, rank: int) -> tuple[Path, Path]:
    from PIL import Image

    from tinymodels import WORDS

    data, images, done = root / "data.json", root / "images", root / ".done"
    if rank == 0 and not done.exists():
        images.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        records = []
        for i in range(n):
            Image.effect_noise((image_size, image_size * 3 // 4), 60).convert("RGB").save(images / f"{i}.png")
            q = " ".join(rng.choice(WORDS) for _ in range(words // 4))
            a = " ".join(rng.choice(WORDS) for _ in range(words - words // 4))
            records.append({"id": str(i), "image": f"{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
        data.write_text(json.dumps(records))
        done.touch()
    while not done.exists():
        time.sleep(1)
    return data, images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", *SIZES], default="7b")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps to time (the first two are not counted)")
    parser.add_argument("--words", type=int, default=120, help="words of text per sample (the image adds its tokens)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value, as for `llava train`")
    args = parser.parse_args()

    import torch

    from train import config as cfgmod
    from train.stages import run
    from train.logs import read

    rank = int(os.environ.get("RANK", "0"))
    llm, clip = _models(args.size, rank)
    probe = cfgmod.load(args.config, args.overrides)
    image_size = 56 if args.size == "tiny" else 336
    run_dir = OUT / "runs" / f"{Path(args.config).name.removesuffix('.toml')}-{args.size}-{int(time.time())}"
    data, images = _data(probe.global_batch_size * args.steps, args.words, image_size, run_dir, rank)
    cfg = cfgmod.load(args.config, args.overrides + [
        f"llm={llm}", f"vision_tower={clip}", "init=", "projector=", f"data={data}", f"image_folder={images}",
        f"output_dir={run_dir / 'out'}", f"max_steps={args.steps}", "save_steps=0", "resume=never", "tensorboard=false",
    ])
    cfg.validate(cfg.stage)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run(cfg)
    log = read(run_dir / "out")
    rates = [r["samples_per_s"] for r in log[2:]] or [r["samples_per_s"] for r in log]
    print(json.dumps({
        "config": args.config,
        "size": args.size,
        "rank": rank,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "global_batch": cfg.global_batch_size,
        "per_device_batch": cfg.per_device_batch_size,
        "samples_per_s": round(statistics.median(rates), 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
