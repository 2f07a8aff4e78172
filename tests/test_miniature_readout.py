"""The cell read-out (`python -m train.miniature.readout`): it finds place where the vectors carry it, does not
where they do not, and scores patches with a shape apart from empty ones."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from train.miniature.readout import CELLS, cell_readout  # noqa: E402


def _patches(n_pictures: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.arange(CELLS).repeat(n_pictures)
    occupied = torch.rand(len(cells), generator=g) < 0.4
    noise = torch.randn(len(cells), 32, generator=g)
    code = torch.nn.functional.one_hot(cells, 32).float() * 6
    return cells, occupied, noise, code


def test_vectors_that_carry_their_cell_are_read():
    cells, occupied, noise, code = _patches(60)
    r = cell_readout(noise + code, cells, occupied)
    assert r["shape"] >= 0.9 and r["empty"] >= 0.9, r


def test_vectors_without_place_read_near_chance():
    cells, occupied, noise, _ = _patches(60)
    r = cell_readout(noise, cells, occupied)
    assert r["all"] <= 0.3, r  # chance is 1/9


def test_patches_with_a_shape_are_scored_apart_from_empty_ones():
    cells, occupied, noise, code = _patches(60)
    x = noise + code * (~occupied).float().unsqueeze(1)  # only empty patches say where they are
    r = cell_readout(x, cells, occupied)
    assert r["empty"] >= 0.9 and r["shape"] <= 0.3, r
