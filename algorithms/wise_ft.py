"""WiSE-FT (Wortsman et al., CVPR 2022; mlfoundations/wise-ft src/wise_ft.py): the
weight-space ensemble of a method's zero-shot and fine-tuned weights,

    theta(alpha) = (1 - alpha) * theta_zero-shot + alpha * theta_fine-tuned,

over every floating-point tensor the method's checkpoint holds (the image encoder, the
moving average it predicts with, a trained head), applied to a saved model without
retraining. The zero-shot endpoint is the method as built before any training step (CLIP's
pretrained encoder; a head at its zero-shot start, `ZERO_SHOT_VALUES`); frozen parts
(the text classifier) are the same at both ends. Not a method of its own (nothing
registers): `evaluation/wise_ft.py` runs it over finished DomainBed jobs.
Documentation: docs/methods/wise_ft.md.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

NAME = "WiSE-FT"
DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))  # 0, 0.1, ..., 1 (the papers' grid)
# a head's zero-shot start where the method declares the choice (CLIPLP's `lp_init`)
ZERO_SHOT_VALUES = {"lp_init": "zeroshot"}


def interpolate(theta_0: Mapping[str, torch.Tensor], theta_1: Mapping[str, torch.Tensor],
                alpha: float) -> dict:
    """(1 - alpha) theta_0 + alpha theta_1 per floating-point tensor; other tensors (step
    counters) from theta_1. Exact at the ends: alpha 0 gives theta_0, alpha 1 theta_1."""
    if set(theta_0) != set(theta_1):
        differ = sorted(set(theta_0) ^ set(theta_1))
        raise ValueError(f"{NAME}: the two weight sets hold different tensors "
                         f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})")
    theta = {}
    for key, start in theta_0.items():
        end = theta_1[key]
        if start.shape != end.shape:
            raise ValueError(f"{NAME}: {key} is {tuple(start.shape)} zero-shot but "
                             f"{tuple(end.shape)} fine-tuned")
        if torch.is_floating_point(end):
            # not torch.lerp: start + alpha (end - start) is not end at alpha 1
            theta[key] = start.to(end.dtype) * (1 - alpha) + end * alpha
        else:
            theta[key] = end.clone()
    return theta


def check_alphas(alphas: Sequence[float]) -> tuple:
    """The grid, sorted and without duplicates; ValueError for a value outside [0, 1]."""
    bad = [a for a in alphas if not (math.isfinite(a) and 0 <= a <= 1)]
    if bad or not alphas:
        raise ValueError(f"{NAME}: alphas must be numbers in [0, 1]; got "
                         f"{', '.join(map(str, bad)) if bad else 'none'}")
    return tuple(sorted(set(float(a) for a in alphas)))


def zero_shot_values(method_cls, values: Mapping) -> dict:
    """The fine-tuned job's hyperparameter values with any head started zero-shot."""
    declared = method_cls.hparams()
    return {**values, **{k: v for k, v in ZERO_SHOT_VALUES.items() if k in declared}}


class WeightSpaceEnsemble:
    """A method between its zero-shot weights (its state when given) and `fine_tuned`
    (a state_dict of the same method): `at(alpha)` loads theta(alpha) and returns it."""

    def __init__(self, method, fine_tuned: Mapping[str, torch.Tensor]):
        if not method.trains:
            raise ValueError(f"{NAME}: {method.name} trains nothing (no fine-tuned weights)")
        self.method = method
        getattr(method, "averager", None)  # a weight average starts at the zero-shot weights
        self.zero_shot = {k: v.detach().clone() for k, v in method.state_dict().items()}
        self.fine_tuned = {k: v.to(self.zero_shot[k].device) if k in self.zero_shot else v
                           for k, v in fine_tuned.items()}
        interpolate(self.zero_shot, self.fine_tuned, 1.0)  # same tensors, or ValueError now

    @torch.no_grad()
    def at(self, alpha: float):
        self.method.load_state_dict(interpolate(self.zero_shot, self.fine_tuned, alpha))
        return self.method
