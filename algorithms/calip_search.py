"""CALIP's beta search (algorithms/calip.py): the reference's 200 x 200 grid over
(beta2, beta3), best top-1 accuracy of s0 + beta2 s2 + beta3 s3 on a held-out set.

The search is exact and vectorised (`grid_search`): logits are linear in (beta2,
beta3) given S0, S2, S3, so an image is classified correctly on the set where its
label's margin over every other class, d0 + beta2 d2 + beta3 d3, stays positive, a
convex region. Classes whose margin stays positive on the whole grid box are dropped
(one pass over the data), then for each beta2 row the feasible beta3 interval of every
image is an intersection of half-lines, counted on the grid with searchsorted and a
cumulative sum: 200 small passes instead of 40,000 argmaxes over [N, C].
`grid_search_loop` is the straightforward per-pair loop (tests, benchmark).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


def beta_grid(high: float, size: int = 200, low: float = 0.001) -> torch.Tensor:
    """The reference's grid: low + i (high - low) / size, i = 0..size-1 (float64)."""
    return torch.tensor([i * (high - low) / size + low for i in range(int(size))],
                        dtype=torch.float64)


@dataclass
class GridSearchResult:
    beta2s: torch.Tensor    # [G2]
    beta3s: torch.Tensor    # [G3]
    correct: torch.Tensor   # [G2, G3] correctly classified images at each pair
    num_images: int

    def best(self) -> Tuple[float, float, float]:
        """(beta2, beta3, accuracy) of the first best pair in row-major order, as the
        reference's `acc > best_acc` loop (beta2 outer, beta3 inner)."""
        flat = int(torch.argmax(self.correct.flatten()))
        i, j = divmod(flat, self.correct.shape[1])
        accuracy = float(self.correct[i, j]) / max(1, self.num_images)
        return float(self.beta2s[i]), float(self.beta3s[j]), accuracy


def grid_search(s0, s2, s3, labels, beta2s, beta3s,
                max_elements: int = 1 << 22) -> GridSearchResult:
    """Correct counts of argmax_c(s0 + b2 s2 + b3 s3) == label for every grid pair,
    without evaluating the pairs one by one; equal to `grid_search_loop` except where a
    class's logit ties the label's within rounding. beta3s must be ascending."""
    device = s0.device
    b2 = torch.as_tensor(beta2s, dtype=torch.float64, device=device)
    b3 = torch.as_tensor(beta3s, dtype=torch.float64, device=device)
    if len(b3) > 1 and not bool((b3[1:] >= b3[:-1]).all()):
        raise ValueError("beta3s must be ascending")
    labels = labels.to(device)
    n, c = s0.shape
    g2, g3 = len(b2), len(b3)
    diff = torch.zeros(g2, g3 + 1, dtype=torch.long, device=device)
    always_right = 0
    lo2, hi2, lo3, hi3 = b2.min(), b2.max(), b3.min(), b3.max()
    rows = max(1, max_elements // max(1, c))
    for start in range(0, n, rows):
        y = labels[start:start + rows]
        margins = [(s[start:start + rows].double().gather(1, y[:, None])
                    - s[start:start + rows].double()) for s in (s0, s2, s3)]
        d0, d2, d3 = margins
        # the label's margin over class c is linear on the box [lo2, hi2] x [lo3, hi3]:
        # its extremes are sums of the per-axis extremes
        low = d0 + torch.minimum(lo2 * d2, hi2 * d2) + torch.minimum(lo3 * d3, hi3 * d3)
        high = d0 + torch.maximum(lo2 * d2, hi2 * d2) + torch.maximum(lo3 * d3, hi3 * d3)
        low.scatter_(1, y[:, None], float("inf"))      # the label does not compete
        high.scatter_(1, y[:, None], float("inf"))
        relevant = low <= 0
        count = relevant.sum(dim=1)
        wrong = (high < 0).any(dim=1)                   # beaten on the whole box
        right = (count == 0)
        always_right += int(right.sum())
        todo = torch.nonzero(~right & ~wrong).flatten()
        if len(todo) == 0:
            continue
        todo = todo[torch.argsort(count[todo])]           # similar K per sub-chunk
        for sub in torch.split(todo, 1024):
            k = int(count[sub].max())
            cls = low[sub].topk(k, dim=1, largest=False).indices          # [m, K]
            a0, a2, a3 = (d[sub].gather(1, cls) for d in margins)
            after_label = cls > y[sub][:, None]        # ties go to the lower index
            step = max(1, max_elements // (len(sub) * k))
            for r in range(0, g2, step):
                _count_feasible(diff[r:r + step], b2[r:r + step], b3, a0, a2, a3, after_label)
    correct = diff.cumsum(dim=1)[:, :g3] + always_right
    return GridSearchResult(b2.cpu(), b3.cpu(), correct.cpu(), n)


def _count_feasible(diff, b2, b3, a0, a2, a3, after_label):
    """For each beta2 in b2 and image: the beta3 interval where the label beats every
    listed class (margin a0 + b2 a2 + b3 a3 > 0), added to diff as +1/-1 at its grid ends."""
    a = a0[None] + b2[:, None, None] * a2[None]                         # [g, m, K]
    d = a3[None].expand_as(a)
    bound = -a / torch.where(d == 0, torch.ones_like(d), d)
    lower = torch.where(d > 0, bound, torch.full_like(a, -float("inf"))).amax(dim=2)
    upper = torch.where(d < 0, bound, torch.full_like(a, float("inf"))).amin(dim=2)
    dead = ((d == 0) & ((a < 0) | ((a == 0) & ~after_label[None]))).any(dim=2)
    first = torch.searchsorted(b3, lower.contiguous(), right=True)       # b3 > lower
    stop = torch.searchsorted(b3, upper.contiguous(), right=False)       # b3 < upper
    ok = (~dead & (stop > first)).long()
    diff.scatter_add_(1, first, ok)
    diff.scatter_add_(1, stop, -ok)


def grid_search_loop(s0, s2, s3, labels, beta2s, beta3s) -> GridSearchResult:
    """The straightforward reference: one argmax over [N, C] per (beta2, beta3) pair."""
    correct = torch.zeros(len(beta2s), len(beta3s), dtype=torch.long)
    for i, b2 in enumerate(beta2s.tolist()):
        for j, b3 in enumerate(beta3s.tolist()):
            logits = s0 + b2 * s2 + b3 * s3
            correct[i, j] = int((logits.argmax(dim=1) == labels).sum())
    return GridSearchResult(torch.as_tensor(beta2s).cpu(), torch.as_tensor(beta3s).cpu(),
                            correct, len(labels))
