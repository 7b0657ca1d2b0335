"""DPL, domain prompt learning (Zhang et al., "Domain Prompt Learning for Efficiently
Adapting CLIP to Unseen Domains", 2021; shogi880/DPLCLIP). Documentation: docs/methods/dpl.md.

A prompt generator (an MLP) maps each image's CLIP feature to n token embeddings; their
mean over a domain's images is that domain's context, put into "[SOS] X..X name . [EOS]"
in place of the n X's for every class. With frozen CLIP image and text towers:

    ctx_d  = mean_{x in batch of domain d} MLP(f(x))      [n, W]   W: text width
    t_c,d  = g([SOS] ctx_d name_c . [EOS])                  text features of class c
    logits = logit_scale norm(f(x)) norm(t_d)^T             for x of domain d

Training: a DomainBed batch is the training domains' batches concatenated in order
(`context.domains_per_step` equal parts); each part gets its own context and the
cross-entropy is taken over all images. Prediction: the context is the mean over the
evaluated batch (DomainBed evaluates one domain at a time).

From the reference (domainbed/algorithms.py DPLCLIP, hparams_registry.py,
networks.MLP @ 53b1ff4): MLP Linear(E, width), then depth - 2 hidden Linear(width, width),
each followed by dropout and ReLU, then Linear(width, n W); Xavier-uniform weights, biases
0.01; the MLP sees the unnormalised image feature; SGD with momentum, no weight decay.
Not taken: the reference scores every image against all domains' prompts at once
([B, domains x C] logits, labels < C), so that each domain's images are trained to match
the first domain's prompts; here each domain's images meet their own domain's prompts.
The prompt assembly and text forward are CoOp's (algorithms/coop.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.coop import (assemble_prompts, check_text_tower, class_token_order,
                             encode_prompts, prompt_template)
from algorithms.core.hparams import HParams, choice, fixed, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


class PromptGenerator(nn.Module):
    """The reference's MLP: image feature [B, E] -> n token embeddings [B, n, W]."""

    def __init__(self, feature_dim: int, tokens: int, token_dim: int, width: int,
                 depth: int, dropout: float):
        super().__init__()
        if depth < 2:
            raise ValueError(f"mlp_depth must be at least 2, got {depth}")
        sizes = [feature_dim] + [width] * (depth - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(width, tokens * token_dim)
        self.tokens, self.token_dim = tokens, token_dim
        for layer in [*self.hidden, self.output]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, 0.01)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for layer in self.hidden:
            x = F.relu(self.dropout(layer(x)))
        return self.output(x).reshape(len(features), self.tokens, self.token_dim)


def domain_contexts(generated: torch.Tensor, domains: int) -> torch.Tensor:
    """[domains, n, W]: the mean generated tokens of each of `domains` equal parts of the
    batch [B, n, W] (parts in batch order)."""
    return torch.stack([part.mean(dim=0) for part in generated.tensor_split(domains)])


@register_method
class DPL(CLIPMethod):
    name = "DPL"
    trains = True

    @staticmethod
    def hparams() -> HParams:
        hparams = dict(clip_hparams())
        hparams.update({
            "num_domain_tokens": choice(16, (2, 4, 8, 16)),
            "mlp_depth": fixed(3),
            "mlp_width": choice(512, (256, 512)),
            "mlp_dropout": choice(0.1, (0.0, 0.1)),
            "lr": log_uniform(1e-3, -4.5, -2.5),
            "momentum": choice(0.1, (0.0, 0.1, 0.2)),
            "weight_decay": fixed(0.0),
        })
        return hparams

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        check_text_tower(self.clip, self.name)
        n = int(cfg.num_domain_tokens)
        device = self.class_embeddings.device
        ids, name_lens = prompt_template(self.tokenizer, self.classnames, n, where=self.name)
        ids = ids.to(device)
        with torch.no_grad():
            template = self.clip.token_embedding(ids).float()
        order = class_token_order(name_lens, n, "end", ids.shape[1]).to(device)
        self.register_buffer("template", template, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("token_ids", ids, persistent=False)
        self.generator = PromptGenerator(
            self.class_embeddings.shape[1], n, template.shape[-1], int(cfg.mlp_width),
            int(cfg.mlp_depth), float(cfg.mlp_dropout)).to(device)

    def trainable_parameters(self):
        return self.generator.parameters()

    def make_optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def image_features(self, images):
        """CLIP's unnormalised image features (the generator's input), frozen encoder."""
        with torch.no_grad():
            return self.run_encoder(self.clip.encode_image, images)

    def text_features(self, contexts: torch.Tensor, classes: int) -> torch.Tensor:
        """[domains, classes, D] normalised text features of each context [domains, n, W]."""
        prompts = assemble_prompts(contexts[:, None], self.template[:classes],
                                   self.order[:classes])
        features = self.run_encoder(encode_prompts, self.clip, prompts,
                                    self.token_ids[:classes])
        return F.normalize(features, dim=-1)

    def domain_logits(self, features: torch.Tensor, domains: int, classes: int):
        contexts = domain_contexts(self.generator(features), domains)
        text = self.text_features(contexts, classes)                      # [G, C, D]
        parts = F.normalize(features, dim=-1).tensor_split(domains)
        return torch.cat([self.logit_scale * part @ text[g].T for g, part in enumerate(parts)])

    def loss(self, images, labels):
        logits = self.domain_logits(self.image_features(images),
                                    self.context.domains_per_step, self.train_classes)
        return F.cross_entropy(logits, labels), {}

    def predict(self, images):
        return self.domain_logits(self.image_features(images), 1, len(self.classnames))
