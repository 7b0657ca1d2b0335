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
from algorithms.core.hparams import HParam, HParams, uniform
from algorithms.core.registry import register_method


def margin_logits(features: torch.Tensor, class_embeddings: torch.Tensor,
                  labels: torch.Tensor, alpha: float, scale) -> torch.Tensor:
    """features [B, D] normalised, class_embeddings [C, D] normalised, labels [B]."""
    return scale * (features - alpha * class_embeddings[labels]) @ class_embeddings.T


CLIPOOD_BATCH_SIZE = 12  # per source domain, thuml/CLIPood scripts.sh (-b 12)
# domain + class shift ("in the wild", open-world DomainBed variants): scripts.sh
IN_THE_WILD = {"OfficeHomeOpen": {"lr": 3e-6, "margin_alpha": 0.1, "bma_beta": 0.1},
               "DomainNetOpen": {"lr": 5e-6, "margin_alpha": 0.1, "bma_beta": 0.5}}


def clipood_hparams(dataset: str | None = None, margin: float = 0.3,
                    batch_size: int = CLIPOOD_BATCH_SIZE) -> HParams:
    """CLIPood's own recipe (thuml/CLIPood main.py, scripts.sh): margin 0.3 on every
    dataset, 12 images per source domain, 10 epochs x 500 steps (DomainNet 20), lr 5e-6
    (1e-5 OfficeHome, DomainNet), BMA beta 0.5."""
    hparams = finetune_hparams(dataset, batch_size=batch_size)
    hparams["margin_alpha"] = uniform(margin, 0.1, 0.5)
    for name, value in IN_THE_WILD.get(dataset, {}).items():
        hparams[name] = HParam(value, hparams[name].sample)
    return hparams


@register_method
class CLIPood(VisualFinetuner):
    name = "CLIPood"

    @staticmethod
    def hparams(dataset: str | None = None) -> HParams:
        return clipood_hparams(dataset)

    def loss(self, images, labels):
        features = F.normalize(self.run_encoder(self.visual, images), dim=-1)
        logits = margin_logits(features, self.train_class_embeddings, labels,
                               self.hp["margin_alpha"], self.logit_scale)
        return F.cross_entropy(logits, labels), {}
