"""Linear probe: a linear classifier trained on frozen, normalised CLIP image features
(AdamW + cosine schedule). `lp_init`: 'random' (the standard probe) or 'zeroshot'
(weights start at logit_scale * text classifier, bias 0). A probe has no weights for
classes it never saw, so it cannot be evaluated on new classes. Evaluation features come
from the shared feature cache (algorithms/core/method.py `eval_features`); the
features of training batches (randomly augmented) are computed every step.
Documentation: docs/methods/cliplp.md."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.core.hparams import HParams, choice, fixed, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


@register_method
class CLIPLP(CLIPMethod):
    name = "CLIPLP"
    trains = True
    tiny_hparams = {"lp_init": "zeroshot"}  # the usual start (a random head needs far more steps)
    cache_features = True  # the encoder is frozen: evaluation features shared with ZSCLIP

    @staticmethod
    def hparams(dataset: str | None = None) -> HParams:
        hparams = dict(clip_hparams())
        hparams.update({
            "lr": log_uniform(1e-3, -4.0, -2.0),
            "weight_decay": log_uniform(1e-4, -6.0, -2.0),
            "batch_size": choice(36, (24, 32, 36, 48)),
            "total_steps": fixed(5000),
            "lp_init": fixed("random"),
        })
        return hparams

    def __init__(self, classnames, hparams, device=None):
        super().__init__(classnames, hparams, device)
        embeddings = self.class_embeddings
        self.head = nn.Linear(embeddings.shape[1], embeddings.shape[0]).to(embeddings.device)
        if hparams["lp_init"] == "zeroshot":
            with torch.no_grad():
                self.head.weight.copy_(self.logit_scale * embeddings)
                self.head.bias.zero_()
        elif hparams["lp_init"] != "random":
            raise ValueError(f"lp_init {hparams['lp_init']!r} not in ('random', 'zeroshot')")
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=hparams["lr"],
                                           weight_decay=hparams["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, int(hparams["total_steps"])))

    def update(self, images, labels):
        with torch.no_grad():
            features = self.encode_image(images)  # training batches: never cached
        with self.fp32():
            loss = F.cross_entropy(self.head(features)[:, :self.train_classes], labels)
        return {"loss": self.step(loss)}

    def predict(self, images):
        return self.head(self.eval_features(images))
