"""FLYP, "Finetune Like You Pretrain" (Goyal et al., CVPR 2023; locuslab/FLYP
src/models/flyp_loss.py): fine-tunes the whole CLIP, both towers and the logit scale,
with CLIP's own contrastive loss, each training image against a caption made from its
class name and one of the prompt templates (drawn per image, per step). Predictions: the
zero-shot classifier of the fine-tuned text tower over every template, as FLYP evaluates.
Documentation: docs/methods/flyp.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from algorithms import backbone
from algorithms.core.hparams import HParams, choice, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     scale) -> torch.Tensor:
    """CLIP's loss over a batch of pairs (row i of each is pair i, both normalised):
    (CE(s I T^T, i) + CE(s T I^T, i)) / 2. Pairs with the same caption are negatives."""
    logits = scale * image_features @ text_features.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def flyp_hparams() -> HParams:
    """FLYP's AdamW (locuslab/FLYP README: lr 1e-5, weight decay 0.1 on ImageNet, 0.2 on
    iWildCam and FMoW, 0.0 for transfer; lr 1e-6 in one few-shot run)."""
    hparams = dict(clip_hparams())
    hparams.update({
        "lr": log_uniform(1e-5, -6.0, -4.5),
        "weight_decay": choice(0.1, (0.0, 0.1, 0.2)),
    })
    return hparams


@register_method
class FLYP(CLIPMethod):
    name = "FLYP"
    trains = True
    frozen_modules = ()  # nothing frozen: both towers and the logit scale train

    @staticmethod
    def hparams() -> HParams:
        return flyp_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.clip.requires_grad_(True)
        templates = backbone.resolve_templates(cfg.templates)
        prompts = [t.format(name) for name in self.classnames for t in templates]
        tokens = self.tokenizer(prompts).to(self.class_embeddings.device)
        # captions[c, k]: class c's name in template k
        self.register_buffer("captions", tokens.view(len(self.classnames), len(templates), -1),
                             persistent=False)
        self._text_head = (None, None)  # (text-tower parameter versions, classifier)
        self.register_load_state_dict_post_hook(lambda module, keys: module.forget_text_head())

    def trainable_parameters(self):
        return self.clip.parameters()

    def batch_captions(self, labels: torch.Tensor) -> torch.Tensor:
        """Each image's caption: its class in one template, drawn at random per image."""
        per_class = self.captions.shape[1]
        if per_class == 1:
            return self.captions[labels, 0]
        drawn = torch.randint(per_class, labels.shape, device=labels.device)
        return self.captions[labels, drawn]

    def loss(self, images, labels):
        image_features = F.normalize(self.run_encoder(self.clip.encode_image, images), dim=-1)
        text_features = F.normalize(
            self.run_encoder(self.clip.encode_text, self.batch_captions(labels)), dim=-1)
        return contrastive_loss(image_features, text_features, self.logit_scale), {}

    def forget_text_head(self) -> None:
        self._text_head = (None, None)

    def after_step(self):
        self.forget_text_head()  # the weights moved (and any average of them)
        return super().after_step()

    def text_head(self) -> torch.Tensor:
        """[C, D] zero-shot classifier of the current text tower over the templates, in
        fp32; recomputed after a step or a load, or when a text-side parameter was changed
        in place or swapped (an averaged copy: other storage) since the last one."""
        params = [p for n, p in self.clip.named_parameters() if not n.startswith("visual.")]
        versions = tuple((p.data_ptr(), p._version) for p in params)
        if self._text_head[0] != versions:
            with self.fp32():
                head = backbone.text_classifier(self.clip, self.tokenizer, self.classnames,
                                                self.cfg.templates,
                                                self.class_embeddings.device)
            self._text_head = (versions, head)
        return self._text_head[1]

    def predict(self, images):
        with torch.no_grad():
            head = self.text_head()
        return self.logit_scale * self.encode_image(images) @ head.T
