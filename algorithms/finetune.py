"""Full fine-tuning of CLIP's image encoder against its frozen text classifier, the
machinery CLIPood and AlignCLIP share (thuml/CLIPood main.py, engine.py):
AdamW + cosine schedule over `total_steps`, the encoder forward at the method's
`precision` and the loss in fp32 (algorithms/core/method.py), the encoder kept in eval mode while it
trains (the reference's "Freeze all Norm Layers": BatchNorm statistics and dropout
frozen, LayerNorm affine weights still train), and the weight averaging every training
method has (algorithms/core/averaging.py), here Beta moving average (BMA) by default, as
CLIPood. Baseline `CLIPFT`: cross-entropy, no averaging.
Documentation: docs/methods/clipft.md (averaging: docs/methods/weight_averaging.md).
"""
from __future__ import annotations

import torch.nn.functional as F

from algorithms.core.averaging import averaging_hparams
from algorithms.core.hparams import HParams, choice, fixed, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


def finetune_hparams(bma: bool = True) -> HParams:
    """The fine-tuning hyperparameters; per-dataset values (lr 1e-5 on OfficeHome and
    DomainNet, ...) are in the recipe book (recipes/recipes.yaml). `bma` is the switch
    that came before `averaging` (see VisualFinetuner.averaging_kind)."""
    hparams = dict(clip_hparams())
    hparams.update({
        "lr": log_uniform(5e-6, -5.7, -4.7),
        "weight_decay": log_uniform(0.1, -2.0, 0.0),
        "bma": fixed(bma),
    })
    hparams.update(averaging_hparams("bma" if bma else "none",
                                     bma_beta=choice(0.5, (0.1, 0.5, 1.0))))
    return hparams


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

    def averaging_kind(self) -> str:
        """`averaging`, or what the older switch asks when it differs from the declared
        default: `bma: true` is averaging bma, `bma: false` turns BMA off; a conflicting
        pair (`bma: true` with another averaging) is refused."""
        kind = super().averaging_kind()
        declared = type(self).default_hparams()
        if self.cfg.bma == declared["bma"]:
            return kind
        chosen = kind != declared["averaging"]
        if self.cfg.bma:
            if chosen and kind != "bma":
                raise ValueError(f"{self.name}: bma true and averaging {kind!r} disagree; "
                                 f"set averaging only")
            return "bma"
        if kind == "bma" and chosen:
            raise ValueError(f"{self.name}: bma false and averaging 'bma' disagree; "
                             f"set averaging only")
        return "none" if kind == "bma" else kind

    def trainable_parameters(self):
        return self.visual.parameters()

    def encode_image(self, images):
        """Normalised features of the image tower (inside `averaged_weights()`, which the
        method core wraps this in, it holds the average when there is one)."""
        return F.normalize(self.run_encoder(self.visual, images), dim=-1)

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
