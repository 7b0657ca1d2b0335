"""Full fine-tuning of CLIP's image encoder against its frozen text classifier, the
machinery CLIPood and AlignCLIP share (thuml/CLIPood main.py, engine.py):
AdamW + cosine schedule over `total_steps`, the encoder forward at the method's
`precision` and the loss in fp32 (algorithms/core/method.py), the encoder kept in eval mode while it
trains (the reference's "Freeze all Norm Layers": BatchNorm statistics and dropout
frozen, LayerNorm affine weights still train), and an optional Beta moving average
(BMA) of the weights that is used for prediction. Baseline `CLIPFT`: cross-entropy.
Documentation: docs/methods/clipft.md (BMA: docs/methods/clipood.md).
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from algorithms.core.hparams import HParams, choice, fixed, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


def finetune_hparams(bma: bool = True) -> HParams:
    """The fine-tuning hyperparameters; per-dataset values (lr 1e-5 on OfficeHome and
    DomainNet, ...) are in the recipe book (recipes/recipes.yaml)."""
    hparams = dict(clip_hparams())
    hparams.update({
        "lr": log_uniform(5e-6, -5.7, -4.7),
        "weight_decay": log_uniform(0.1, -2.0, 0.0),
        "bma": fixed(bma),
        "bma_beta": choice(0.5, (0.1, 0.5, 1.0)),
    })
    return hparams


class BetaMovingAverage(nn.Module):
    """Weight average with step weights w_t = Beta(beta, beta).pdf((t + 0.5) / (T + 1)),
    updated as avg <- (avg + r * theta) / (1 + r), r = w_t / sum_{s<t} w_s."""

    def __init__(self, module: nn.Module, beta: float, total_steps: int):
        super().__init__()
        self.average = copy.deepcopy(module).requires_grad_(False).eval()
        self.pdf = stats.beta(beta, beta).pdf
        self.total_steps = total_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("weight_sum", torch.tensor(self.weight(0), dtype=torch.float64))

    def weight(self, step: int) -> float:
        return float(self.pdf((step + 0.5) / (self.total_steps + 1)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.average.eval()
        return self

    @torch.no_grad()
    def update(self, module: nn.Module) -> float:
        self.step += 1
        weight = self.weight(int(self.step))
        relative = weight / float(self.weight_sum)
        for avg, param in zip(self.average.parameters(), module.parameters()):
            avg.mul_(1.0 / (1 + relative)).add_(param, alpha=relative / (1 + relative))
        self.weight_sum += weight
        return weight


class VisualFinetuner(CLIPMethod):
    """Trains `self.visual` (CLIP's image tower, shared with self.clip). Subclasses
    implement `loss(images, labels) -> (loss, summary)`."""
    trains = True

    @staticmethod
    def hparams() -> HParams:
        return finetune_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.visual = self.clip.visual.requires_grad_(True)
        self.bma = (BetaMovingAverage(self.visual, cfg.bma_beta, context.total_steps)
                    if cfg.bma else None)

    def trainable_parameters(self):
        return self.visual.parameters()

    def after_step(self) -> Dict[str, float]:
        return {"bma_weight": self.bma.update(self.visual)} if self.bma is not None else {}

    def eval_visual(self) -> nn.Module:
        return self.bma.average if self.bma is not None else self.visual

    def encode_image(self, images):
        """Normalised features of the encoder that predicts (the moving average when on)."""
        return F.normalize(self.run_encoder(self.eval_visual(), images), dim=-1)

    def predict(self, images):
        return self.logit_scale * self.encode_image(images) @ self.class_embeddings.T


@register_method
class CLIPFT(VisualFinetuner):
    """CLIP fine-tuning: cross-entropy on the frozen zero-shot text classifier."""
    name = "CLIPFT"

    @staticmethod
    def hparams() -> HParams:
        return finetune_hparams(bma=False)

    def loss(self, images, labels):
        features = F.normalize(self.run_encoder(self.visual, images), dim=-1)
        logits = self.logit_scale * features @ self.train_class_embeddings.T
        return F.cross_entropy(logits, labels), {}
