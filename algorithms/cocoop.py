"""CoCoOp (Zhou et al., CVPR 2022; KaiyangZhou/CoOp trainers/cocoop.py): CoOp's context
shifted per image by a meta-net of the image's features, so every image has its own
prompts. Registered as `CoCoOpHarness`, beside CoOp's own Dassl trainer `CoCoOp`.

    pi(x) = meta_net(normalize(f(x)))            Linear(E, E/16) - ReLU - Linear(E/16, D)
    v_m(x) = v_m + pi(x)                         the same shift for every context vector
    z_c(x) = tau * <normalize(f(x)), normalize(g(P_c(x)))>

The prompt pieces are CoOp's (algorithms/coop.py); the class name is at the end.
Documentation: docs/methods/coop.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.coop import PromptLearner, PromptMethod, encode_prompts, prompt_hparams
from algorithms.core.hparams import HParams
from algorithms.core.registry import register_method

PROMPTS_PER_FORWARD = 4096  # prediction: images per text-tower forward = this // classes


def meta_net(image_dim: int, ctx_dim: int) -> nn.Sequential:
    """CoCoOp's meta-net: image features [B, E] -> one context shift [B, D]."""
    hidden = max(1, image_dim // 16)
    return nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, ctx_dim))


def conditioned_context(ctx: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """[B, 1, n, D]: the context [n, D] plus each image's shift [B, D] on every vector
    (the 1 broadcasts over classes in `assemble_prompts`)."""
    return (ctx.unsqueeze(0) + shift.unsqueeze(1)).unsqueeze(1)


def cocoop_hparams() -> HParams:
    """CoOp's prompt hyperparameters without class-specific context or class-token
    position (CoCoOp has neither): 4 vectors from "a photo of a" (vit_b16_c4_ep10_batch1_ctxv1)."""
    hparams = prompt_hparams()
    del hparams["csc"], hparams["class_token_position"]
    return hparams


@register_method
class CoCoOpHarness(PromptMethod):
    name = "CoCoOpHarness"

    @staticmethod
    def hparams() -> HParams:
        return cocoop_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.meta_net = meta_net(self.class_embeddings.shape[1],
                                 self.prompt.template.shape[-1]).to(self.class_embeddings.device)

    def make_prompt_learner(self) -> PromptLearner:
        return PromptLearner(self.clip, self.tokenizer, self.classnames, n_ctx=self.cfg.n_ctx,
                             ctx_init=self.cfg.ctx_init, where=self.name)

    def trainable_parameters(self):
        return [*self.prompt.parameters(), *self.meta_net.parameters()]

    def conditioned_logits(self, features: torch.Tensor, classes: int = None) -> torch.Tensor:
        """[B, C] logits of normalised image features [B, E] against each image's own
        prompts of the first `classes` classes."""
        ctx = conditioned_context(self.prompt.ctx, self.meta_net(features))
        prompts = self.prompt(ctx, classes)  # [B, C, L, D]
        ids = self.prompt.token_ids[:classes]
        text = F.normalize(self.run_encoder(encode_prompts, self.clip, prompts, ids), dim=-1)
        return self.logit_scale * torch.einsum("be,bce->bc", features, text)

    def loss(self, images, labels):
        with torch.no_grad():
            features = self.encode_image(images)
        return F.cross_entropy(self.conditioned_logits(features, self.train_classes), labels), {}

    def predict(self, images):
        with torch.no_grad():
            features = self.encode_image(images)
            chunk = max(1, PROMPTS_PER_FORWARD // len(self.classnames))
            return torch.cat([self.conditioned_logits(part) for part in features.split(chunk)])
