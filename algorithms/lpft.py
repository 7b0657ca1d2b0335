"""LP-FT (Kumar et al., ICLR 2022; AnanyaKumar/transfer_learning): a linear probe, then
full fine-tuning that starts from the probe's head, both stages in one job.

Steps split: the first `lp_steps = floor(lp_fraction * total_steps)` train only the
CLIPLP head (algorithms/linear_probe.py: same head, init and AdamW with `lp_lr`,
`lp_weight_decay`, cosine over the LP steps; features under no_grad); the rest train the
image encoder and the same head together with the reference's second-stage optimiser,
SGD with momentum (`lr`, `momentum`, `weight_decay`), cosine over the FT steps. The
encoder stays in eval mode throughout (the reference's `use_net_val_mode`, the
harness's VisualFinetuner). Logits: z = W normalize(f(x)) + b, cross-entropy.
Documentation: docs/methods/lpft.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from algorithms.core.hparams import HParams, fixed, log_uniform, uniform
from algorithms.core.method import TrainingState
from algorithms.core.registry import register_method
from algorithms.finetune import VisualFinetuner, finetune_hparams
from algorithms.linear_probe import CLIPLP, probe_head


def lp_steps(lp_fraction: float, total_steps: int) -> int:
    """How many of the job's steps the linear-probe stage takes."""
    if not 0.0 <= lp_fraction <= 1.0:
        raise ValueError(f"lp_fraction {lp_fraction!r} not in [0, 1]")
    return math.floor(lp_fraction * total_steps + 1e-9)  # 0.29 * 100 is 28.999...


class StagedTrainingState(TrainingState):
    """Training stages one after the other, each its own optimiser and schedule:
    `optimizer` and `scheduler` are those of the current stage, which is the first whose
    schedule has not yet taken its `lengths[i]` steps. One state_dict holds them all."""

    def __init__(self, stages: Sequence[Tuple[torch.optim.Optimizer, object]],
                 lengths: Sequence[int], grad_scaler=None):
        self.stages, self.lengths, self.grad_scaler = list(stages), list(lengths), grad_scaler

    @property
    def stage(self) -> int:
        for i, ((_, scheduler), length) in enumerate(zip(self.stages, self.lengths)):
            if scheduler.last_epoch < length:
                return i
        return len(self.stages) - 1

    @property
    def optimizer(self):
        return self.stages[self.stage][0]

    @property
    def scheduler(self):
        return self.stages[self.stage][1]

    def state_dict(self) -> dict:
        state = {"stages": [{"optimizer": o.state_dict(), "scheduler": s.state_dict()}
                            for o, s in self.stages]}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("stages", ())) != len(self.stages):
            raise KeyError(f"expected {len(self.stages)} training stages in the state")
        for (optimizer, scheduler), saved in zip(self.stages, state["stages"]):
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def lpft_hparams() -> HParams:
    """CLIPFT's shared declarations (no averaging by default), CLIPLP's head settings for the
    LP stage (renamed lp_*), the reference's SGD for the FT stage and the split."""
    hparams = finetune_hparams(bma=False)
    probe = CLIPLP.hparams()
    hparams.update({
        "lp_lr": probe["lr"],
        "lp_weight_decay": probe["weight_decay"],
        "lp_init": probe["lp_init"],
        "lp_fraction": uniform(0.5, 0.1, 0.9),
        "lr": log_uniform(1e-5, -6.5, -2.0),  # the reference's LP-FT sweep, 3e-7 .. 1e-2
        "weight_decay": fixed(0.0),  # the reference's SGD (resnet50_transfer.yaml)
        "momentum": fixed(0.9),
    })
    return hparams


@register_method
class LPFT(VisualFinetuner):
    name = "LPFT"

    @staticmethod
    def hparams() -> HParams:
        return lpft_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.head = probe_head(self.class_embeddings, self.logit_scale, cfg.lp_init)
        self.lp_steps = lp_steps(cfg.lp_fraction, int(context.total_steps))
        self._staged = None

    def trainable_parameters(self):
        """The FT stage's: encoder and head (weight averaging covers both)."""
        return [*self.visual.parameters(), *self.head.parameters()]

    @property
    def training_state(self) -> StagedTrainingState:
        """The LP stage (AdamW on the head) for `lp_steps` steps, then the FT stage (SGD
        on encoder + the same head, so it starts from the probe's weights)."""
        if self._staged is None:
            ft_steps = int(self.context.total_steps) - self.lp_steps
            probe = torch.optim.AdamW(self.head.parameters(), lr=self.cfg.lp_lr,
                                      weight_decay=self.cfg.lp_weight_decay)
            full = torch.optim.SGD(self.trainable_parameters(), lr=self.cfg.lr,
                                   momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR
            stages = [(probe, cosine(probe, T_max=max(1, self.lp_steps))),
                      (full, cosine(full, T_max=max(1, ft_steps)))]
            self._staged = StagedTrainingState(stages, [self.lp_steps, ft_steps],
                                               self.grad_scaler)
        return self._staged

    @property
    def in_lp_stage(self) -> bool:
        return self.training_state.stage == 0

    def loss(self, images, labels):
        probing = self.in_lp_stage
        with torch.no_grad() if probing else contextlib.nullcontext():  # LP: encoder frozen
            features = F.normalize(self.run_encoder(self.visual, images), dim=-1)
        logits = self.head(features)[:, :self.train_classes]
        return F.cross_entropy(logits, labels), {"lp_stage": float(probing),
                                                 "lp_steps": float(self.lp_steps)}

    def predict(self, images):
        return self.head(self.encode_image(images))
