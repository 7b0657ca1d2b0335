"""Weight averaging for every training method: `averaging: none | ema | swad | bma`,
declared once (`averaging_hparams`) and run by the method core (algorithms/core/method.py)
over the parameters a method already declares, `trainable_parameters()`; the method
predicts with the average. Formulas, defaults and sources: docs/methods/weight_averaging.md.

- EMA: avg <- d * avg + (1 - d) * theta after every step, from theta_0; d = `ema_decay`.
- BMA (CLIPood): step weights w_t = Beta(b, b).pdf((t + 0.5) / (T + 1)), from theta_0;
  avg <- (avg + r * theta) / (1 + r), r = w_t / sum_{s<t} w_s; b = `bma_beta`.
- SWAD (kakaobrain/miro domainbed/swad.py LossValley): segment averages (uniform over
  each segment's steps) with one loss per segment; `LossValley` decides from the losses
  which segments the final average holds (loss-based start and end of the window).

Each averager holds `average`: one tensor per averaged parameter (buffers, so that a
checkpoint predicts as the run did), and `ready`: whether there is an average yet.
"""
from __future__ import annotations

import collections
import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from algorithms.core.hparams import HParams, fixed

KINDS = ("none", "ema", "swad", "bma")


def averaging_hparams(default: str = "none", bma_beta=None) -> HParams:
    """The averaging hyperparameters (not searched: the ablation sets `averaging`).
    SWAD's three valley values are the reference's (miro config.yaml swad_kwargs)."""
    if default not in KINDS:
        raise ValueError(f"averaging {default!r} not in {KINDS}")
    return {
        "averaging": fixed(default),
        "ema_decay": fixed(0.999),
        "bma_beta": bma_beta or fixed(0.5),
        "swad_segments": fixed(25),       # the reference: 5000 steps / checkpoint_freq 200
        "swad_n_converge": fixed(3),
        "swad_n_tolerance": fixed(6),
        "swad_tolerance_ratio": fixed(0.3),
    }


def check_kind(kind: str, where: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"{where}: averaging {kind!r} not in {', '.join(KINDS)}")
    return kind


def _register_average(module: nn.Module, params: Sequence[torch.Tensor]) -> None:
    module.average_names = [f"average_{i}" for i in range(len(params))]
    for name, param in zip(module.average_names, params):
        module.register_buffer(name, param.detach().clone())


class Averager(nn.Module):
    """Base: `update(params, loss)` after every step (-> summary terms), `average`."""

    def __init__(self, params: Sequence[torch.Tensor]):
        super().__init__()
        _register_average(self, params)

    @property
    def average(self) -> List[torch.Tensor]:
        return [getattr(self, name) for name in self.average_names]

    @property
    def ready(self) -> bool:
        return True

    def update(self, params: Sequence[torch.Tensor], loss: float) -> Dict[str, float]:
        raise NotImplementedError


class ExponentialMovingAverage(Averager):
    def __init__(self, params, decay: float):
        super().__init__(params)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay

    @torch.no_grad()
    def update(self, params, loss=None) -> Dict[str, float]:
        for avg, param in zip(self.average, params):
            avg.mul_(self.decay).add_(param.detach(), alpha=1.0 - self.decay)
        return {}


class BetaMovingAverage(Averager):
    """CLIPood's BMA over `total_steps` steps; the summary term `bma_weight` is w_t."""

    def __init__(self, params, beta: float, total_steps: int):
        super().__init__(params)
        self.pdf = stats.beta(beta, beta).pdf
        self.total_steps = total_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("weight_sum", torch.tensor(self.weight(0), dtype=torch.float64))

    def weight(self, step: int) -> float:
        return float(self.pdf((step + 0.5) / (self.total_steps + 1)))

    @torch.no_grad()
    def update(self, params, loss=None) -> Dict[str, float]:
        self.step += 1
        weight = self.weight(int(self.step))
        relative = weight / float(self.weight_sum)
        for avg, param in zip(self.average, params):
            avg.mul_(1.0 / (1 + relative)).add_(param.detach(), alpha=relative / (1 + relative))
        self.weight_sum += weight
        return {"bma_weight": weight}


# --- SWAD -----------------------------------------------------------------------------

class Segment:
    """A segment's uniform weight average (on the CPU), its steps and its loss."""

    def __init__(self, weights: List[torch.Tensor], start: int, end: int, loss: float):
        self.weights, self.start, self.end, self.loss = weights, start, end, loss


class RunningMean:
    """Equal-weight mean of what `add` gets; as the reference's AveragedModel, the
    first `add` replaces the initial weights (count 0) rather than averaging with them."""

    def __init__(self, first: Segment):
        self.weights = [w.clone() for w in first.weights]
        self.count, self.start, self.end = 0, first.start, first.end

    def add(self, segment: Segment) -> None:
        for avg, w in zip(self.weights, segment.weights):
            if self.count == 0:
                avg.copy_(w)
            else:
                avg.add_((w - avg) / (self.count + 1))
        if self.count == 0:
            self.start = segment.start
        self.count += 1
        self.end = segment.end

    def copy(self) -> "RunningMean":
        return copy.deepcopy(self)


class LossValley:
    """SWAD's window rule (miro's LossValley), on segments in order: converged when the
    first of the last `n_converge` segments has the lowest loss (threshold = their mean
    loss * (1 + tolerance_ratio)); the window then takes segments while the lowest loss
    of the last `n_tolerance` is at most the threshold, and is dead once it is not."""

    def __init__(self, n_converge: int, n_tolerance: int, tolerance_ratio: float):
        self.n_converge, self.n_tolerance = n_converge, n_tolerance
        self.tolerance_ratio = tolerance_ratio
        self.converge_q = collections.deque(maxlen=n_converge)
        self.smooth_q = collections.deque(maxlen=n_tolerance)
        self.final: Optional[RunningMean] = None
        self.converge_step: Optional[int] = None
        self.threshold: Optional[float] = None
        self.dead = False

    @property
    def converged(self) -> bool:
        return self.converge_step is not None

    def smooth_loss(self, segments) -> float:
        return min(s.loss for s in segments)

    def add(self, segment: Segment) -> None:
        if self.dead:
            return
        self.converge_q.append(segment)
        self.smooth_q.append(segment)
        if not self.converged:
            self._detect_convergence()
            return
        if self.smooth_q[0].end < self.converge_step:
            return
        if self.smooth_loss(self.smooth_q) > self.threshold:
            self.dead = True
            return
        self.final.add(self.smooth_q[0])

    def _detect_convergence(self) -> None:
        if len(self.converge_q) < self.n_converge:
            return
        losses = [s.loss for s in self.converge_q]
        if int(np.argmin(losses)) != 0:
            return
        self.converge_step = self.converge_q[0].end
        self.final = RunningMean(self.converge_q[0])
        self.threshold = float(np.mean(losses)) * (1.0 + self.tolerance_ratio)
        if self.n_tolerance < self.n_converge:
            for segment in list(self.converge_q)[1:1 + self.n_converge - self.n_tolerance]:
                self.final.add(segment)
        elif self.n_tolerance > self.n_converge:
            # back from the until-min segment: the window starts after the last one above
            # the threshold (and, as the reference, one segment later)
            window = list(self.smooth_q)[:self.n_tolerance - self.n_converge + 1]
            start = 0
            for i in reversed(range(len(window))):
                if window[i].loss > self.threshold:
                    start = i + 1
                    break
            for segment in window[start + 1:]:
                self.final.add(segment)

    def final_average(self) -> Optional[RunningMean]:
        """What the run ends with if it ends now (the reference's get_final_model, which
        leaves this rule unchanged): before convergence the last segment; else the window,
        closed with the remaining segments while the lowest loss of those left is at most
        the threshold. None before the first segment."""
        if not self.converged:
            return RunningMean(self.converge_q[-1]) if self.converge_q else None
        final = self.final.copy()
        if not self.dead:
            pending = list(self.smooth_q)[1:]
            while pending and self.smooth_loss(pending) <= self.threshold:
                final.add(pending.pop(0))
        return final


class SWAD(Averager):
    """Segments of `interval` steps (the last one ends at `total_steps`), each with the
    mean of the losses its steps report; the average is the LossValley's final average,
    refreshed at every segment's end (before the first: the live weights)."""

    def __init__(self, params, total_steps: int, segments: int, n_converge: int,
                 n_tolerance: int, tolerance_ratio: float):
        super().__init__(params)
        if segments < 1 or n_converge < 1 or n_tolerance < 1:
            raise ValueError("swad_segments, swad_n_converge and swad_n_tolerance must be >= 1")
        self.total_steps = max(1, int(total_steps))
        self.interval = max(1, -(-self.total_steps // segments))  # ceil
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.register_buffer("segments_seen", torch.zeros((), dtype=torch.long))
        self.step = 0
        self._start_segment()

    def _start_segment(self) -> None:
        self._sum: Optional[List[torch.Tensor]] = None
        self._losses: List[float] = []
        self._start = self.step + 1

    @property
    def ready(self) -> bool:
        return int(self.segments_seen) > 0

    @torch.no_grad()
    def update(self, params, loss: float) -> Dict[str, float]:
        self.step += 1
        weights = [p.detach().float().cpu() for p in params]
        if self._sum is None:
            self._sum = [w.clone() for w in weights]
        else:
            for total, w in zip(self._sum, weights):
                total.add_(w)
        self._losses.append(float(loss))
        if self.step % self.interval == 0 or self.step == self.total_steps:
            self.end_segment()
        return {}

    @torch.no_grad()
    def end_segment(self) -> None:
        """Close the current segment: its mean weights and mean loss go to the valley."""
        n = len(self._losses)
        mean = [total / n for total in self._sum]
        self.valley.add(Segment(mean, self._start, self.step, sum(self._losses) / n))
        final = self.valley.final_average()
        for avg, w in zip(self.average, final.weights):
            avg.copy_(w)
        self.segments_seen += 1
        self._start_segment()


def make_averager(kind: str, cfg, params: Sequence[torch.Tensor], total_steps: int):
    """The averager of `kind` over `params` (None for "none")."""
    if kind == "none":
        return None
    if kind == "ema":
        return ExponentialMovingAverage(params, cfg.ema_decay)
    if kind == "bma":
        return BetaMovingAverage(params, cfg.bma_beta, total_steps)
    return SWAD(params, total_steps, cfg.swad_segments, cfg.swad_n_converge,
                cfg.swad_n_tolerance, cfg.swad_tolerance_ratio)
