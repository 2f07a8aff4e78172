"""The miniature's vision tower: a small CLIP ViT, pre-trained on the generated pictures, then frozen.

Architecture: transformers' CLIPVisionModel (quick_gelu, pre-LN, CLS token, learned positions), 96 px pictures
in 32 px patches, so a 3 x 3 grid: 9 image tokens for the language model (LLaVA takes the penultimate layer's
patch states and drops CLS). The patches are the scene's cells, so each image token shows at most one shape,
whole: the tower learns shapes in a few hundred steps that way (a grid of small patches unaligned with the
cells took thousands), and the language model looks a shape up among 9 tokens, not dozens. The FFN width is
kept different from the hidden width (llama.cpp's clip loader would read equal sizes as swapped weights).

Objective: instead of CLIP's caption contrast (which needs a text tower and far more data than a few minutes
allow), the tower learns from what the generator knows about every picture, read out linearly:

- per patch, from the penultimate layer (the features LLaVA uses): the colour, kind and size of the shape in
  the patch's cell (or none), and which cell it is. These are exactly the patch words that the language
  model read in pre-training (data.grid_text), so the projector has an easy job;
- per patch too: which patch words the whole scene holds (multi-hot), so each patch's features are
  shaped by the whole picture as well (what counts and comparisons draw on);
- per picture, from the mean of those patch states and from the final layer's pooled CLS: how many shapes
  there are, and how many of each colour and each kind.

The heads are thrown away; what is kept is a CLIPVisionModel that llava-hf and `llava convert` take as it is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llavacli.images import preprocess
from train.miniature import data as D

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURE_LAYER = -2  # LLaVA's vision_feature_layer


@dataclass(frozen=True)
class TowerShape:
    image_size: int = D.TOWER_SIZE
    patch_size: int = D.TOWER_SIZE // D.PATCHES
    hidden: int = 128
    ff: int = 512
    layers: int = 4
    heads: int = 4

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid**2


def tower_config(shape: TowerShape) -> CLIPVisionConfig:
    assert shape.ff != shape.hidden, "llama.cpp's clip loader takes equal FFN and hidden sizes for swapped weights"
    assert shape.image_size % shape.patch_size == 0
    return CLIPVisionConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.ff,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def image_processor(shape: TowerShape) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,  # bicubic, as llavacli.images.preprocess
    )


def to_pixels(img: Image.Image, size: int, mode: str = "pad") -> torch.Tensor:
    """A picture as the tower sees it: LLaVA's preprocessing, then CLIP's scaling and normalisation."""
    arr = np.asarray(preprocess(img, size, mode), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Targets


N_COLOR = len(D.COLORS) + 1  # 0: background
N_KIND = len(D.SHAPES) + 1
N_SIZE = len(D.SIZES) + 1
N_COUNT = D.MAX_OBJECTS + 1  # 0..5
COLOR_INDEX = {c: i + 1 for i, c in enumerate(D.COLORS)}
KIND_INDEX = {k: i + 1 for i, k in enumerate(D.SHAPES)}
SIZE_INDEX = {s: i + 1 for i, s in enumerate(D.SIZES)}


def scene_targets(scene: D.Scene, shape: TowerShape) -> dict[str, np.ndarray]:
    g = shape.grid
    owners = D.patch_owners(scene, g).reshape(g, g)
    n_obj = len(scene.shapes)
    color = np.zeros((g, g), np.int64)
    kind = np.zeros((g, g), np.int64)
    size = np.zeros((g, g), np.int64)
    for i, s in enumerate(scene.shapes):
        mask = owners == i
        color[mask], kind[mask], size[mask] = COLOR_INDEX[s.color], KIND_INDEX[s.kind], SIZE_INDEX[s.size]
    per = g // D.GRID
    rows, cols = np.divmod(np.arange(g * g), g)
    return {
        "cell": (rows // per) * D.GRID + cols // per,
        "color": color.reshape(-1),
        "kind": kind.reshape(-1),
        "size": size.reshape(-1),
        "total": np.int64(n_obj),
        "per_color": np.array([scene.count(color=c) for c in D.COLORS], np.int64),
        "per_kind": np.array([scene.count(kind=k) for k in D.SHAPES], np.int64),
        "words": scene_words(scene),
    }


WORDS = [(size, color, kind) for kind in D.SHAPES for color in D.COLORS for size in D.SIZES]


def scene_words(scene: D.Scene) -> np.ndarray:
    """Which patch words (size, colour, kind) the scene holds: the table every patch is taught to carry."""
    present = {(s.size, s.color, s.kind) for s in scene.shapes}
    return np.array([w in present for w in WORDS], np.float32)


class Heads(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.color = nn.Linear(hidden, N_COLOR)
        self.kind = nn.Linear(hidden, N_KIND)
        self.size = nn.Linear(hidden, N_SIZE)
        self.cell = nn.Linear(hidden, D.GRID * D.GRID)
        self.words = nn.Linear(hidden, len(WORDS))  # from every patch: the whole scene
        n_global = N_COUNT * (1 + len(D.COLORS) + len(D.SHAPES))
        self.pooled = nn.Linear(hidden, n_global)  # from the mean patch state (the features LLaVA sees)
        self.cls = nn.Linear(hidden, n_global)  # from the final pooled CLS (trains the last layer)

    def losses(self, tower: CLIPVisionModel, pixels: torch.Tensor, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = tower(pixel_values=pixels, output_hidden_states=True)
        feats = out.hidden_states[FEATURE_LAYER][:, 1:]  # (B, N, H): the patches LLaVA projects
        ce = nn.functional.cross_entropy
        covered = t["color"].flatten() > 0  # kind and size are only asked of patches in a shape's cell
        losses = {
            "color": ce(self.color(feats).flatten(0, 1), t["color"].flatten()),
            "kind": ce(self.kind(feats).flatten(0, 1)[covered], t["kind"].flatten()[covered]),
            "size": ce(self.size(feats).flatten(0, 1)[covered], t["size"].flatten()[covered]),
            "cell": ce(self.cell(feats).flatten(0, 1), t["cell"].flatten()),
            "words": nn.functional.binary_cross_entropy_with_logits(
                self.words(feats), t["words"][:, None, :].expand(-1, feats.shape[1], -1)
            ) * len(WORDS) / 4,
        }
        counts = torch.cat([t["total"][:, None], t["per_color"], t["per_kind"]], 1)  # (B, 12)
        for name, h in (("pooled", self.pooled(feats.mean(1))), ("cls", self.cls(out.pooler_output))):
            logits = h.view(h.shape[0], -1, N_COUNT)
            losses[name] = ce(logits.flatten(0, 1), counts.flatten())
        return losses


# ---------------------------------------------------------------------------------------------------------------
# Pre-training


@dataclass(frozen=True)
class VisionTraining:
    epochs: int = 3
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05


def load_pictures(image_dir: Path, scenes: list[D.Scene], shape: TowerShape) -> torch.Tensor:
    """The pictures as uint8 (N, 3, S, S) after LLaVA's preprocessing (normalised per batch, to save memory)."""
    out = torch.empty((len(scenes), 3, shape.image_size, shape.image_size), dtype=torch.uint8)
    for i, scene in enumerate(scenes):
        split, idx = scene.id.split("-")
        with Image.open(image_dir / split / f"{idx}.png") as img:
            out[i] = torch.from_numpy(np.array(preprocess(img, shape.image_size, "pad"))).permute(2, 0, 1)
    return out


def normalise(u8: torch.Tensor) -> torch.Tensor:
    x = u8.float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def cosine_lr(step: int, total: int, base: float, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    return base * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def pretrain_tower(
    out_dir: Path,
    data_dir: Path,
    shape: TowerShape = TowerShape(),
    cfg: VisionTraining = VisionTraining(),
    seed: int = 0,
    log=print,
) -> dict:
    """Pre-train the tower on the train split, save it (CLIPVisionModel + CLIPImageProcessor) to out_dir.

    Returns a summary: the loss curve and held-out per-patch accuracies.
    """
    torch.manual_seed(seed)
    train_scenes = D.load_scenes(data_dir, "train")
    test_scenes = D.load_scenes(data_dir, "test")
    images = data_dir / "images"
    x_train = load_pictures(images, train_scenes, shape)
    x_test = load_pictures(images, test_scenes, shape)
    t_train = _stack([scene_targets(s, shape) for s in train_scenes])
    t_test = _stack([scene_targets(s, shape) for s in test_scenes])

    tower = CLIPVisionModel(tower_config(shape))
    heads = Heads(shape.hidden)
    params = list(tower.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    n = len(train_scenes)
    steps_per_epoch = n // cfg.batch
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(seed)
    curve = []
    start = time.time()
    step = 0
    tower.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch : (b + 1) * cfg.batch]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, cfg.lr, cfg.warmup)
            losses = heads.losses(tower, normalise(x_train[idx]), {k: v[idx] for k, v in t_train.items()})
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            curve.append(loss.item())
            step += 1
            if step % 20 == 0 or step == total:
                log(f"vision step {step}/{total} loss {sum(curve[-20:]) / len(curve[-20:]):.4f} ({time.time() - start:.0f}s)")
    tower.eval()
    metrics = evaluate_tower(tower, heads, x_test, t_test)
    log("vision held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out_dir)
    image_processor(shape).save_pretrained(out_dir)
    return {"loss": curve, "heldout": metrics, "seconds": time.time() - start}


@torch.no_grad()
def evaluate_tower(tower: CLIPVisionModel, heads: Heads, x: torch.Tensor, t: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out accuracy of the linear read-outs: per patch (on patches a shape covers) and per picture."""
    hits = {"color": 0, "kind": 0, "size": 0}
    covered = 0
    total_hits = 0
    words_hits = 0.0
    for b in range(0, len(x), 100):
        out = tower(pixel_values=normalise(x[b : b + 100]), output_hidden_states=True)
        feats = out.hidden_states[FEATURE_LAYER][:, 1:]
        mask = t["color"][b : b + 100] > 0
        covered += int(mask.sum())
        for k in hits:
            pred = getattr(heads, k)(feats).argmax(-1)
            hits[k] += int(((pred == t[k][b : b + 100]) & mask).sum())
        logits = heads.pooled(feats.mean(1)).view(len(feats), -1, N_COUNT)
        total_hits += int((logits[:, 0].argmax(-1) == t["total"][b : b + 100]).sum())
        words = heads.words(feats) > 0  # (B, N, W): the scene read from each patch alone
        words_hits += float((words == (t["words"][b : b + 100, None, :] > 0)).all(-1).float().mean(1).sum())
    n = len(x)
    return {
        **{f"patch_{k}": v / max(1, covered) for k, v in hits.items()},
        "count": total_hits / n,
        "scene_from_one_patch": words_hits / n,
    }


def _stack(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}
