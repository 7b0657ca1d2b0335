"""MIRO (Cha et al., ECCV 2022; kakaobrain/miro domainbed/algorithms/miro.py): CLIPFT's
fine-tuning plus a mutual-information regulariser that keeps the fine-tuned features
close to those of the frozen pre-trained encoder (the "oracle"), at the stem and the end
of each stage of the image tower (algorithms/backbone/taps.py `stage_ends`).

Per tapped layer l, with f_l the fine-tuned and f0_l the pre-trained features, the mean
encoder the identity and the variance encoder a learnt per-channel
var_l = softplus(b_l) + eps (initialised to 0.1), the variational bound
    R_l = mean((f_l - f0_l)^2 / var_l + log var_l) / 2
enters the loss as  L = CE + mi_lambda * sum_l R_l.
Documentation: docs/methods/miro.md.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.backbone.taps import encode_image_layers, stage_ends
from algorithms.core.hparams import HParams, fixed, log_uniform
from algorithms.core.registry import register_method
from algorithms.finetune import VisualFinetuner, finetune_hparams

VARIANCE_INIT = 0.1  # the reference's VarianceEncoder(init=0.1)
VARIANCE_EPS = 1e-5  # and its eps


def variance_shape(feature_shape: Sequence[int]) -> tuple:
    """One variance per channel: [B, C, H, W] -> (1, C, 1, 1); tokens [B, N, C] -> (1, 1, C)."""
    if len(feature_shape) == 4:
        return (1, feature_shape[1], 1, 1)
    if len(feature_shape) == 3:
        return (1, 1, feature_shape[2])
    raise ValueError(f"MIRO taps [B, C, H, W] or [B, N, C] features, got shape {tuple(feature_shape)}")


class VarianceEncoder(nn.Module):
    """A learnt per-channel variance, independent of the input: softplus(b) + eps."""

    def __init__(self, feature_shape: Sequence[int], init: float = VARIANCE_INIT,
                 eps: float = VARIANCE_EPS):
        super().__init__()
        self.eps = eps
        start = torch.log(torch.expm1(torch.tensor(init - eps, dtype=torch.float64)))
        self.b = nn.Parameter(torch.full(variance_shape(feature_shape), start.item()))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.b) + self.eps


def mi_regulariser(features: Sequence[torch.Tensor], pre_features: Sequence[torch.Tensor],
                   variances: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l mean((f_l - f0_l)^2 / var_l + log var_l) / 2: the negative Gaussian
    log-likelihood of the pre-trained features given the fine-tuned ones (mean encoder
    the identity), constants dropped; the mean runs over every element of f_l."""
    if not len(features) == len(pre_features) == len(variances):
        raise ValueError("MIRO: one pre-trained feature and one variance per tapped layer")
    total = features[0].new_zeros(())
    for f, f0, var in zip(features, pre_features, variances):
        total = total + ((f - f0).pow(2) / var + var.log()).mean() / 2
    return total


def miro_hparams() -> HParams:
    """CLIPFT's fine-tuning hyperparameters plus MIRO's lambda (the reference's config.yaml
    `ld: 0.1`; per-dataset values in the recipe book) and the variance encoders' learning
    rate multiplier (config.yaml `lr_mult: 10.`)."""
    hparams = finetune_hparams(bma=False)
    hparams["mi_lambda"] = log_uniform(0.1, -3.0, 0.0)
    hparams["var_lr_mult"] = fixed(10.0)
    return hparams


@register_method
class MIRO(VisualFinetuner):
    """CLIPFT + MIRO's regulariser towards a frozen copy of the pre-trained image tower."""
    name = "MIRO"
    frozen_modules = ("clip", "pretrained_visual")

    @staticmethod
    def hparams() -> HParams:
        return miro_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        # the oracle: the image tower as loaded, before any step; left out of checkpoints
        self.pretrained_visual = copy.deepcopy(self.visual).requires_grad_(False).eval()
        self.tapped_layers = tuple(stage_ends(self.visual))
        self.var_encoders = nn.ModuleList(
            VarianceEncoder(shape) for shape in self._tapped_shapes())

    def _tapped_shapes(self):
        size = self.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        probe = torch.zeros(1, 3, *size, device=self.class_embeddings.device)
        with torch.no_grad():
            _, taps = encode_image_layers(self.pretrained_visual, probe, self.tapped_layers)
        return [t.shape for t in taps]

    def trainable_parameters(self):
        return [*self.visual.parameters(), *self.var_encoders.parameters()]

    def make_optimizer(self, params):
        """AdamW; the variance encoders at lr x var_lr_mult (as the reference)."""
        variance = {id(p) for p in self.var_encoders.parameters()}
        groups = [{"params": [p for p in params if id(p) not in variance]},
                  {"params": [p for p in params if id(p) in variance],
                   "lr": self.cfg.lr * self.cfg.var_lr_mult}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def loss(self, images, labels):
        pooled, taps = self.run_encoder(encode_image_layers, self.visual, images,
                                        self.tapped_layers)
        with torch.no_grad():
            _, pre_taps = self.run_encoder(encode_image_layers, self.pretrained_visual, images,
                                           self.tapped_layers)
        logits = self.logit_scale * F.normalize(pooled, dim=-1) @ self.train_class_embeddings.T
        cls = F.cross_entropy(logits, labels)
        reg = mi_regulariser(taps, pre_taps, [encoder() for encoder in self.var_encoders])
        return cls + self.cfg.mi_lambda * reg, {"loss_cls": cls.item(), "loss_mi": reg.item()}
