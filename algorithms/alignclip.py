"""AlignCLIP (Han et al., "Navigating the Misalignments for Robust Vision-Language
Generalization"), docs/methods/alignclip.md. A CLIPood fork:

  L = L_cls + lambda * (AAL + L_last),  lambda = 10

- L_cls on CLIPood's margin logits, with semantic label smoothing (SLS, default),
  plain label smoothing (1 - epsilon) or none.
  SLS: P = row-softmax(s * T T^T) over class text embeddings (s = 35), once;
  target q_y = epsilon (0.9), q_c = P[y, c] otherwise, not renormalised (as the
  reference); L = -sum_c q_c log softmax(z)_c, batch mean.
- AAL = KL(g || a): a = CLS->patch attention of the first L = 5 blocks (head-averaged,
  L1-normalised over patches, averaged over blocks); g = softmax over patches of
  cos(D-V patch token, t_y). `F.kl_div(a.log(), g, 'batchmean')` as in the reference.
- L_last = KL(D-V || normal) of the patch distributions softmax_k cos(patch_k, t_c)
  of the two branches' last-layer tokens, over all classes, batchmean.
- D-V branch: parameter-shared, forks `dv_layers` blocks before the end (CLIP
  Surgery's dual path; see backbone.encode_image_taps); 'vvv' is CLIP Surgery's
  V-V-V attention, for the ablation.
- Targets are not detached by default, as in the reference code (gradients also flow
  through the shared D-V branch); `detach_targets` detaches g and the D-V distribution.
Inference is CLIPood's: CLS embedding of the (BMA) encoder against the text classifier.
Precision: the tapped forward runs at the method's `precision` (fused attention kept);
the CLS attention rows, the losses above and the margin logits are computed in fp32.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from algorithms import backbone
from algorithms.clipood import CLIPood, clipood_hparams, margin_logits
from algorithms.core.hparams import HParams, choice, fixed, log_uniform, uniform
from algorithms.core.registry import register_method

LOSS_TYPES = ("sls", "ls", "none")


# --- losses ---------------------------------------------------------------------------

def sls_matrix(class_embeddings: torch.Tensor, sharpness: float) -> torch.Tensor:
    """P = row-softmax(s * T T^T), T [C, D] normalised."""
    return (sharpness * class_embeddings @ class_embeddings.T).softmax(dim=1)


def sls_targets(sls: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """q_y = epsilon, q_c = P[y, c] for c != y (not renormalised)."""
    targets = sls[labels].clone()
    targets.scatter_(1, labels[:, None], epsilon)
    return targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def layer_averaged_attention(cls_attn: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of L1-normalised CLS->patch attention rows, each [B, P]."""
    return torch.stack([a / a.sum(dim=-1, keepdim=True) for a in cls_attn]).mean(dim=0)


def attention_alignment_loss(attention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || attention), both [B, P] distributions, summed over P, batch mean."""
    return F.kl_div(attention.log(), target, reduction="batchmean")


def aal_target(dv_patches: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
    """g = softmax over patches of cos(D-V patch token, t_y): [B, P]."""
    cos = torch.einsum("bpd,bd->bp", F.normalize(dv_patches, dim=-1), label_embeddings)
    return cos.softmax(dim=1)


def class_patch_distributions(patches: torch.Tensor, class_embeddings: torch.Tensor):
    """For every class, softmax over patches of cos(patch, t_c): [B, C, P]."""
    cos = torch.einsum("bpd,cd->bcp", F.normalize(patches, dim=-1), class_embeddings)
    return cos.softmax(dim=2)


def similarity_alignment_loss(patches: torch.Tensor, dv_patches: torch.Tensor,
                              class_embeddings: torch.Tensor, detach_target=False):
    """KL(D-V || normal) of per-class patch distributions, summed, batch mean."""
    normal = class_patch_distributions(patches, class_embeddings)
    dv = class_patch_distributions(dv_patches, class_embeddings)
    if detach_target:
        dv = dv.detach()
    return F.kl_div(normal.log(), dv, reduction="batchmean")


# --- method ---------------------------------------------------------------------------

def alignclip_hparams() -> HParams:
    """AlignCLIP's hyperparameters: CLIPood's and the alignment terms' (zhyhan/AlignCLIP);
    its per-dataset recipe (margin 0.1 on DomainNet, 36 images per source domain, ...) is
    in the recipe book (recipes/recipes.yaml)."""
    hparams = clipood_hparams()
    hparams.update({
        "align_weight": log_uniform(10.0, 0.0, 1.5),          # lambda
        "aligned_layers": choice(5, (3, 4, 5, 6)),             # first L blocks
        "dv_layers": fixed(6),                                 # D-V branch spans the last 6 blocks
        "dv_mode": fixed("dv"),                                # or "vvv" (CLIP Surgery)
        "loss_type": fixed("sls"),                             # "sls" | "ls" | "none"
        "sls_sharpness": choice(35.0, (20.0, 35.0, 50.0)),
        "sls_epsilon": uniform(0.9, 0.8, 0.95),
        "use_aal": fixed(True),
        "use_last_alignment": fixed(True),
        "detach_targets": fixed(False),
    })
    return hparams


@register_method
class AlignCLIP(CLIPood):
    name = "AlignCLIP"

    @staticmethod
    def hparams() -> HParams:
        return alignclip_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        if cfg.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {cfg.loss_type!r} not in {LOSS_TYPES}")
        needs_taps = cfg.use_aal or cfg.use_last_alignment
        if needs_taps and not isinstance(self.visual, backbone.VisionTransformer):
            raise NotImplementedError(f"AlignCLIP's alignment losses need a ViT; "
                                      f"{cfg.clip_model} is {type(self.visual).__name__}")
        depth = len(self.visual.transformer.resblocks) if needs_taps else 0
        self.attn_layers = tuple(range(min(cfg.aligned_layers, depth)))
        self.dv_start = max(0, depth - cfg.dv_layers)
        self.register_buffer("sls", sls_matrix(self.train_class_embeddings, cfg.sls_sharpness),
                             persistent=False)

    def classification_loss(self, logits, labels):
        kind, epsilon = self.cfg.loss_type, self.cfg.sls_epsilon
        if kind == "sls":
            return soft_cross_entropy(logits, sls_targets(self.sls, labels, epsilon))
        return F.cross_entropy(logits, labels, label_smoothing=1 - epsilon if kind == "ls" else 0.0)

    def loss(self, images, labels):
        cfg = self.cfg
        if cfg.use_aal or cfg.use_last_alignment:
            # the forward at self.precision, its outputs (tokens, attention rows) in fp32
            taps = self.run_encoder(
                backbone.encode_image_taps, self.clip, images,
                attn_layers=self.attn_layers if cfg.use_aal else (),
                dv_start=self.dv_start, dv_mode=cfg.dv_mode, visual=self.visual)
            features = F.normalize(taps.cls, dim=-1)
        else:
            features = F.normalize(self.run_encoder(self.visual, images), dim=-1)
        logits = margin_logits(features, self.train_class_embeddings, labels, cfg.margin_alpha,
                               self.logit_scale)
        loss = self.classification_loss(logits, labels)
        summary: Dict[str, float] = {"loss_cls": loss.item()}
        align = torch.zeros((), device=loss.device)
        if cfg.use_aal:
            target = aal_target(taps.dv_patches, self.class_embeddings[labels])
            if cfg.detach_targets:
                target = target.detach()
            attention = layer_averaged_attention([taps.cls_attn[i] for i in self.attn_layers])
            aal = attention_alignment_loss(attention, target)
            summary["loss_aal"] = aal.item()
            align = align + aal
        if cfg.use_last_alignment:
            last = similarity_alignment_loss(taps.patches, taps.dv_patches,
                                             self.train_class_embeddings,
                                             detach_target=cfg.detach_targets)
            summary["loss_last"] = last.item()
            align = align + last
        return loss + cfg.align_weight * align, summary
