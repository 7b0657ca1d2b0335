"""KgCoOp (Yao et al., CVPR 2023; htyao89/KgCoOp KgCoOp/trainers/kgcoop.py): CoOp plus a
term that keeps the learned class embeddings near the hand-crafted ones.

    L = CE(z, y) + lambda * (1 - 1/C sum_c cos(w_c, w_c^clip))

w_c: the learned prompt's text feature of class c, w_c^clip: the frozen text classifier
of the method's `templates` (in Dassl CoOp's per-dataset template, as the reference's
CUSTOM_TEMPLATES); the mean runs over the training classes. Prediction is CoOp's.
Documentation: docs/methods/kgcoop.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from algorithms.coop import PromptMethod, prompt_hparams
from algorithms.core.hparams import HParams, log_uniform
from algorithms.core.registry import register_method


def knowledge_distance(learned: torch.Tensor, hand_crafted: torch.Tensor) -> torch.Tensor:
    """1 - the mean over classes of cos(learned_c, hand_crafted_c); rows [C, D]."""
    return 1.0 - F.cosine_similarity(learned, hand_crafted, dim=-1, eps=1e-7).mean()


@register_method
class KgCoOp(PromptMethod):
    name = "KgCoOp"

    @staticmethod
    def hparams() -> HParams:
        hparams = prompt_hparams()
        hparams["kg_lambda"] = log_uniform(8.0, 0.0, 1.0)  # scripts: TRAINER.COOP.W 8.0
        return hparams

    def loss(self, images, labels):
        with torch.no_grad():
            features = self.encode_image(images)
        text = self.text_features(self.train_classes)
        ce = F.cross_entropy(self.logit_scale * features @ text.T, labels)
        kg = knowledge_distance(text, self.train_class_embeddings)
        return ce + self.cfg.kg_lambda * kg, {"loss_ce": ce.item(), "loss_kg": kg.item()}
