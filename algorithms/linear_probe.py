"""Linear probe: a linear classifier trained on frozen, normalised CLIP image features
(AdamW + cosine schedule). `lp_init`: 'random' (the standard probe) or 'zeroshot'
(weights start at logit_scale * text classifier, bias 0). The head has one row per
class, open classes included; in open-world jobs the loss is the cross-entropy over the
first `train_classes` logits, so only those rows get gradients: the open classes' rows
keep their initial weights (zero-shot or random), shrunk only by AdamW's weight decay,
and predictions score every class. Evaluation features come from the shared feature
cache (algorithms/core/method.py `eval_features`); the features of training batches
(randomly augmented) are computed every step. Documentation: docs/methods/cliplp.md."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.core.hparams import HParams, fixed, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


LP_INITS = ("random", "zeroshot")


def probe_head(class_embeddings: torch.Tensor, logit_scale, lp_init: str) -> nn.Linear:
    """The probe's head, one row per class: PyTorch's default init ('random'), or the
    zero-shot classifier W = logit_scale * T, b = 0 ('zeroshot'). LPFT starts from it too."""
    head = nn.Linear(class_embeddings.shape[1], class_embeddings.shape[0]).to(class_embeddings.device)
    if lp_init == "zeroshot":
        with torch.no_grad():
            head.weight.copy_(logit_scale * class_embeddings)
            head.bias.zero_()
    elif lp_init not in LP_INITS:
        raise ValueError(f"lp_init {lp_init!r} not in {LP_INITS}")
    return head


@register_method
class CLIPLP(CLIPMethod):
    name = "CLIPLP"
    trains = True
    cache_features = True  # the encoder is frozen: evaluation features shared with ZSCLIP

    @staticmethod
    def hparams() -> HParams:
        hparams = dict(clip_hparams())
        hparams.update({
            "lr": log_uniform(1e-3, -4.0, -2.0),
            "weight_decay": log_uniform(1e-4, -6.0, -2.0),
            "lp_init": fixed("random"),
        })
        return hparams

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.head = probe_head(self.class_embeddings, self.logit_scale, cfg.lp_init)

    def trainable_parameters(self):
        return self.head.parameters()

    def loss(self, images, labels):
        with torch.no_grad():
            features = self.encode_image(images)  # training batches: never cached
        return F.cross_entropy(self.head(features)[:, :self.train_classes], labels), {}

    def predict(self, images):
        return self.head(self.eval_features(images))
