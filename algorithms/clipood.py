"""CLIPood (Shu et al., ICML 2023; thuml/CLIPood engine.py): margin metric softmax
on a fine-tuned image encoder against frozen class text features, with a Beta moving
average of the weights for prediction (algorithms/finetune.py).

Margin logits: z_c = tau * (<f, t_c> - alpha * <t_y, t_c>), f = normalised image
feature, not re-normalised after subtracting alpha * t_y (as in the reference).
Documentation: docs/methods/clipood.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from algorithms.finetune import VisualFinetuner, finetune_hparams
from algorithms.core.hparams import HParams, uniform
from algorithms.core.registry import register_method


def margin_logits(features: torch.Tensor, class_embeddings: torch.Tensor,
                  labels: torch.Tensor, alpha: float, scale) -> torch.Tensor:
    """features [B, D] normalised, class_embeddings [C, D] normalised, labels [B]."""
    return scale * (features - alpha * class_embeddings[labels]) @ class_embeddings.T


def clipood_hparams() -> HParams:
    """CLIPood's hyperparameters (thuml/CLIPood main.py): margin 0.3, BMA beta 0.5, lr
    5e-6; its per-dataset recipe (batch, lr, steps, in-the-wild values) is in the
    recipe book (recipes/recipes.yaml)."""
    hparams = finetune_hparams()
    hparams["margin_alpha"] = uniform(0.3, 0.1, 0.5)
    return hparams


@register_method
class CLIPood(VisualFinetuner):
    name = "CLIPood"

    @staticmethod
    def hparams() -> HParams:
        return clipood_hparams()

    def loss(self, images, labels):
        features = F.normalize(self.run_encoder(self.visual, images), dim=-1)
        logits = margin_logits(features, self.train_class_embeddings, labels,
                               self.cfg.margin_alpha, self.logit_scale)
        return F.cross_entropy(logits, labels), {}
