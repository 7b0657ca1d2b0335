"""CALIP's beta search (algorithms/calip_search.py): the reference's grid, a
hand-computed example, and the vectorised search against the per-pair loop."""
import pytest
import torch

from algorithms import calip_search as bs


def test_beta_grid_is_the_references():
    grid = bs.beta_grid(2.0)
    assert len(grid) == 200 and grid[0] == 0.001
    assert grid[-1].item() == pytest.approx(199 * (2.0 - 0.001) / 200 + 0.001)


def test_grid_search_by_hand():
    """Image 0 (label 0) is right iff 0.5 > 0.4 + b2; image 1 (label 1) iff 0.4 + b3 > 0.5."""
    s0 = torch.tensor([[0.5, 0.4], [0.5, 0.4]])
    s2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    s3 = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    grid = torch.tensor([0.05, 0.2], dtype=torch.float64)
    result = bs.grid_search(s0, s2, s3, torch.tensor([0, 1]), grid, grid)
    assert result.correct.tolist() == [[1, 2], [0, 1]]
    assert result.best() == (0.05, 0.2, 1.0)


def test_grid_search_equals_the_per_pair_loop():
    torch.manual_seed(3)
    n, c = 300, 12
    labels = torch.randint(0, c, (n,))
    s0 = 0.2 + 0.02 * torch.randn(n, c)
    s0[torch.arange(n), labels] += 0.02
    s2, s3 = 0.1 * torch.randn(n, c), 0.5 * torch.randn(n, c)
    for s in (s0, s2, s3):
        s[:, 5] = s[:, 3]  # a duplicated class: exact ties go to the lower index, as argmax
    grids = bs.beta_grid(2.0, 25), bs.beta_grid(0.1, 25)
    fast = bs.grid_search(s0, s2, s3, labels, *grids, max_elements=1 << 10)  # many chunks
    slow = bs.grid_search_loop(s0.double(), s2.double(), s3.double(), labels, *grids)
    assert torch.equal(fast.correct, slow.correct)
    assert fast.best() == slow.best()


def test_best_pair_is_the_first_in_the_references_order():
    result = bs.GridSearchResult(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]),
                                 torch.tensor([[1, 5], [5, 2]]), 10)
    assert result.best() == (1.0, 4.0, 0.5)
