"""What the train tests share: tiny base models (a CLIP tower and a Vicuna-like LLaMA), a small LLaVA data set
with images, config files, and ways to run a stage in this process or as `python -m train`.

The base models are built once per test session (a few seconds) under pytest's base temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlamaTokenizer

from llavacli.prompts import Turn, get_template
from tinymodels import WORDS, Shape, _text_config, make_clip_tower
from train.miniature.language import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHAPE = Shape(image_size=56)  # 4 x 4 patches: 16 image tokens keep CPU steps fast
IMAGE_TOKENS = (SHAPE.image_size // SHAPE.patch_size) ** 2
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def _documents() -> list[str]:
    """Text for the tokenizer: the words of the tiny models, and conversations in the vicuna_v1 template, so that
    pieces such as "▁USER" exist as they do in LLaMA's vocabulary (the system prompt's trailing space then joins
    the role: an edge inside a token, which the labels must not depend on)."""
    rng = random.Random(0)
    template = get_template("vicuna_v1")
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!") for _ in range(2000)]
    talks = [template.render([Turn(sentences[i], i % 2, sentences[i + 1])]) for i in range(0, 400, 2)]
    return sentences + talks


def base_models(root: Path) -> tuple[Path, Path]:
    """(llm_dir, clip_dir): a LLaMA with a SentencePiece tokenizer like Vicuna's (LLaMA's conventions, identity
    normalisation, BOS added), and a CLIP tower."""
    llm, clip = root / "llm", root / "clip"
    if (llm / "config.json").exists() and (clip / "config.json").exists():
        return llm, clip
    spm_dir = root / "spm"
    train_tokenizer(spm_dir, _documents(), vocab=512)
    tok = LlamaTokenizer.from_pretrained(spm_dir, add_bos_token=True, legacy=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_text_config(SHAPE, len(tok), None)).eval()
    model.save_pretrained(llm)
    tok.save_pretrained(llm)
    shutil.copyfile(spm_dir / "tokenizer.model", llm / "tokenizer.model")  # as Vicuna's repository has it
    make_clip_tower(clip, SHAPE)
    return llm, clip


def _picture(path: Path, colour: str, size: tuple[int, int], shape: str) -> None:
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    img.save(path)


def dataset(root: Path, stage: str) -> tuple[Path, Path]:
    """(data.json, image_folder): captions for pretrain; multi-turn, single-turn and text-only for finetune."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes = [(c, s) for c in COLOURS for s in ("circle", "square")]
    for k, (colour, shape) in enumerate(scenes):
        _picture(images / f"{colour}-{shape}.png", colour, (40 + 8 * k, 56 - 2 * k), shape)
    records = []
    for k, (colour, shape) in enumerate(scenes):
        file = f"{colour}-{shape}.png"
        if stage == "pretrain":
            conv = [{"from": "human", "value": "<image>\ndescribe the picture"}, {"from": "gpt", "value": f"a {colour} {shape} on the background"}]
        elif k % 3 == 0:
            conv = [
                {"from": "human", "value": "what color is the shape?\n<image>"},
                {"from": "gpt", "value": f"the shape is {colour}."},
                {"from": "human", "value": "which shape is it?"},
                {"from": "gpt", "value": f"it is a {shape}."},
            ]
        else:
            conv = [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": f"a {colour} {shape}."}]
        records.append({"id": f"{stage}-{k}", "image": file, "conversations": conv})
    if stage == "finetune":
        records.append({"id": "text-0", "conversations": [{"from": "human", "value": "how many sides has a square?"}, {"from": "gpt", "value": "four."}]})
        records.append({"id": "text-1", "conversations": [{"from": "human", "value": "is a circle round?"}, {"from": "gpt", "value": "yes."}]})
    path = root / f"{stage}.json"
    path.write_text(json.dumps(records, indent=1))
    return path, images


def config(path: Path, stage: str, llm: Path, clip: Path, data: Path, images: Path, out: Path, **extra) -> Path:
    values = {
        "stage": stage,
        "llm": str(llm),
        "vision_tower": str(clip),
        "data": str(data),
        "image_folder": str(images),
        "output_dir": str(out),
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "epochs": 1.0,
        "max_length": 256,
        "num_workers": 0,
        "tensorboard": False,
        "gradient_checkpointing": False,
    } | extra
    lines = []
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}


def run_module(args: list[str], extra_env: dict | None = None, timeout: int = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m train ARGS` (or under `launcher`, e.g. torchrun), from the repository root."""
    cmd = (launcher or [sys.executable]) + ["-m", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env() | (extra_env or {}), capture_output=True, text=True, timeout=timeout)


def run_inprocess(args: list[str]) -> int:
    """train.cli.main in this process, with accelerate's process-wide state reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    from train.cli import main

    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")
