"""Where a picture's place information is lost: `python -m train.miniature.readout DIR`.

A by-place question ("What color is the shape in the top left corner?") needs the image token of that
cell to say where it is. This fits a linear classifier that names the cell (one of nine) from each held-out
patch, on two thirds of the recipe's held-out pictures and scores it on the rest, twice: on the vision
tower's features (the layer LLaVA takes, -2) and on the projector's output, which is what the language
model reads. Patches that hold a shape and empty ones are scored apart, since only the first are asked
about.

On the shipped demo's run the tower tells the cell of a patch with a shape 99.6% of the time and the
projector's output 70%. That is a symptom, not the cause: a linear projector keeps the place (99.3%) and
the by-place questions score the same (docs/demo-model.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.miniature import data as D

CELLS = D.PATCHES * D.PATCHES


def features(run: Path, limit: int | None = None):
    """(tower features, projector outputs, cell index, holds a shape) for every patch of the held-out pictures."""
    import torch
    from PIL import Image

    from train.miniature.answer import Answerer

    answerer = Answerer(run / "llava-hf")  # the model and pixels exactly as the transformers evaluation has them
    model = answerer.model
    layer = model.config.vision_feature_layer
    scenes = D.load_scenes(run / "data", "test")[:limit]
    tower, projected, cells, occupied = [], [], [], []
    with torch.no_grad():
        for i, scene in enumerate(scenes):
            pixels = answerer.pixels(Image.open(run / "data" / "images" / "test" / f"{i:05d}.png"))
            patches = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer][0, 1:]  # no CLS
            if len(patches) != CELLS:
                raise SystemExit(f"the tower gives {len(patches)} patches, not one per cell of the {D.GRID}x{D.GRID} grid")
            tower.append(patches)
            projected.append(model.model.multi_modal_projector(patches))
            cells.append(torch.arange(CELLS))
            occupied.append(torch.as_tensor(D.patch_owners(scene)) >= 0)
    return torch.cat(tower), torch.cat(projected), torch.cat(cells), torch.cat(occupied)


def cell_readout(x, cells, occupied, steps: int = 500, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear classifier from a patch's vector to its cell: all, with a shape, empty."""
    import torch

    torch.manual_seed(seed)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    train = torch.arange(len(x)) < len(x) * 2 // 3
    clf = torch.nn.Linear(x.shape[1], CELLS)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x[train]), cells[train]).backward()
        opt.step()
    with torch.no_grad():
        right = clf(x).argmax(1) == cells
    held = ~train
    return {
        "all": right[held].float().mean().item(),
        "shape": right[held & occupied].float().mean().item(),
        "empty": right[held & ~occupied].float().mean().item(),
    }


def readout(run: Path, limit: int | None = None) -> dict[str, dict[str, float]]:
    tower, projected, cells, occupied = features(run, limit)
    return {"tower": cell_readout(tower, cells, occupied), "projector": cell_readout(projected, cells, occupied)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.miniature.readout", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a recipe's --out folder (with data/ and llava-hf/)")
    parser.add_argument("--limit", type=int, help="at most this many held-out pictures")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for part in ("llava-hf", "data"):
        if not (args.run / part).is_dir():
            parser.error(f"{args.run / part} is missing: give the --out folder of a finished `python -m train.miniature` run")
    result = readout(args.run, args.limit)
    if args.json:
        print(json.dumps(result))
    else:
        for where, r in result.items():
            print(f"cell from {where}: {100 * r['all']:.1f}% (patches with a shape {100 * r['shape']:.1f}%, empty {100 * r['empty']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
