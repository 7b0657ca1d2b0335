"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature
Adapters", IJCV 2023): a small residual MLP on the frozen image features, trained with
cross-entropy against the frozen text classifier. Documentation: docs/methods/clip_adapter.md.

    A(f)   = ReLU(ReLU(f W1^T) W2^T)           W1: [D/r, D], W2: [D, D/r], no biases
    f'     = ratio * A(f) + (1 - ratio) * f    the residual mix
    logits = logit_scale * norm(f') T^T        T: the text classifier [C, D]

From the reference (gaopengcuhk/CLIP-Adapter clip_adapter.py @ 08d07f8): reduction 4,
ratio 0.2, bias-free linears, both ReLUs; the adapter alone trains, with the optimiser of
CoOp's configs (SGD, momentum 0.9, lr 2e-3, weight decay 5e-4, cosine). The reference mixes
the raw encoder output; here f is the normalised feature. Bias-free linears and ReLU are
positively homogeneous (A(c f) = c A(f) for c > 0), so f' scales with f and the normalised
f' -- hence the logits -- are the same; this lets the evaluation features come from the
shared feature cache as ZSCLIP's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.core.hparams import HParams, choice, dassl_sgd, fixed
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


class Adapter(nn.Module):
    """A(f) = ReLU(ReLU(f W1^T) W2^T), bias-free, bottleneck D -> D / reduction -> D."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"adapter reduction {reduction} for features of {dim}")
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.up(F.relu(self.down(features))))


def residual_mix(features: torch.Tensor, adapted: torch.Tensor, ratio: float) -> torch.Tensor:
    """f' = ratio * A(f) + (1 - ratio) * f."""
    return ratio * adapted + (1.0 - ratio) * features


@register_method
class CLIPAdapter(CLIPMethod):
    name = "CLIPAdapter"
    trains = True
    cache_features = True  # frozen encoder: evaluation features shared with ZSCLIP

    @staticmethod
    def hparams() -> HParams:
        hparams = dict(clip_hparams())
        hparams.update({
            "ratio": choice(0.2, (0.2, 0.4, 0.6, 0.8)),  # residual ratio alpha
            "reduction": fixed(4),
            **dassl_sgd(low_exp=-4.0),
        })
        return hparams

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.adapter = Adapter(self.class_embeddings.shape[1], cfg.reduction).to(
            self.class_embeddings.device)

    def trainable_parameters(self):
        return self.adapter.parameters()

    def make_optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def adapted_logits(self, features: torch.Tensor, class_embeddings: torch.Tensor):
        mixed = residual_mix(features, self.adapter(features), float(self.cfg.ratio))
        return self.logit_scale * F.normalize(mixed, dim=-1) @ class_embeddings.T

    def loss(self, images, labels):
        with torch.no_grad():
            features = self.encode_image(images)  # training batches: never cached
        return F.cross_entropy(self.adapted_logits(features, self.train_class_embeddings),
                               labels), {}

    def predict(self, images):
        return self.adapted_logits(self.eval_features(images), self.class_embeddings)
