"""The back-projection engine (`recon.lattice.insert`): stepping through the points, several maps in one
insertion, and no points at all give what one insertion of each map does."""
from __future__ import annotations

import torch

from cryofire_ext.recon import lattice


def _points(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=gen) * 2.2 - 1.1, torch.randn(n, 4, 3, generator=gen)  # some outside the grid


def test_insertion_in_steps_and_of_several_maps_equals_one_insertion_per_map(monkeypatch):
    coords, values = _points(5000)
    G = 17
    single = []
    for c in range(values.shape[1]):
        acc = torch.zeros(G, G, G, 3, dtype=torch.float64)
        lattice.insert(acc, coords, values[:, c])
        single.append(acc)
    together = torch.zeros(G, G, G, 4, 3, dtype=torch.float64)
    lattice.insert(together, coords, values)
    monkeypatch.setattr(lattice, "INSERT_VALUES", 97)  # many small steps, uneven at the end
    stepped = torch.zeros(G, G, G, 4, 3, dtype=torch.float64)
    lattice.insert(stepped, coords, values)
    for c, acc in enumerate(single):
        torch.testing.assert_close(together[..., c, :], acc, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stepped[..., c, :], acc, rtol=1e-6, atol=1e-9)
    assert float(single[0][..., 2].abs().sum()) > 0  # something landed


def test_inserting_no_points_leaves_the_grid_as_it_was():
    acc = torch.ones(9, 9, 9, 3)
    lattice.insert(acc, torch.zeros(0, 3), torch.zeros(0, 3))
    lattice.insert_trilinear(acc, torch.zeros(0, 3), torch.zeros(0, 3))
    assert torch.equal(acc, torch.ones(9, 9, 9, 3))
