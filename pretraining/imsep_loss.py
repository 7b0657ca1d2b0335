"""IMSep: the AlignCLIP-IMSep objective of Eslami & de Melo ("Mitigate the Gap", ICLR 2025),
as an open_clip loss module (same call shape as `open_clip.ClipLoss`).

Notation: I, T (N x d) L2-normalised image and text features, tau = logit_scale (already
exp'd, as open_clip passes it), y = arange(N), S the L2-normalised sentence embeddings of
the captions (normalised here), CE the mean cross-entropy over rows.

    L = alpha * [CE(tau I T^T, y) + CE(tau T I^T, y)]                (cross-modal)
      + beta  * [L_I + L_T]                                          (in-modality, IMSep)
    semantic (nl_semantic_supervision), D = 1 - S S^T:
        L_I = CE(tau [(I I^T) * D + diag(<I_i, T_i>)], y)   L_T likewise with T T^T
    rescale ablation: the same with D = 1 - Id (hollow ones; no sentence model)
    neither: L_I = CE(tau I I^T, y), L_T = CE(tau T T^T, y)          (plain in-modality InfoNCE)

`separate_image` / `separate_text` pick which of L_I, L_T are used (both by default, as the
reference README and train_alignCLIP.sh; the authors' last runs used image only).
Defaults alpha 1, beta 0.5 (reference `main/params.py`). `*` is the elementwise product.

Follows the reference (`align_clip/loss.py` ClipInModalityLoss) in two places where it
differs from open_clip: the cross-modal term is the SUM of the two directions (open_clip's
ClipLoss averages them, so with beta = 0 this loss is 2 * alpha * ClipLoss), and the
diagonal of the semantic logits is (I_i.I_i) * D_ii + <I_i, T_i>, i.e. the formula as written
(D_ii = 1 - |S_i|^2 is zero up to rounding).
Deviation: the reference trains on sum({total, clip, inModality}), i.e. twice this loss;
here `output_dict=True` returns only the two parts, {"clip_loss", "imsep_loss"}, and
open_clip_train's sum of them is L itself, NOT doubled.

Distributed: image, text and sentence features are all gathered with open_clip's
`gather_features` (the reference never gathers the sentence features, so its semantic
loss only has matching shapes in one process). Settings that make loss and gradients
equal the single-process loss on the global batch under DDP's gradient averaging:
  - gather_with_grad=True, local_loss=False: every rank computes the global loss;
  - gather_with_grad=True, local_loss=True: each rank the rows of its own samples
    against all columns; the mean over ranks is the global loss.
With gather_with_grad=False (open_clip_train's default) gradients reach only the local
features, so after averaging they are the global gradient divided by the world size, as
for open_clip's ClipLoss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features


class IMSepLoss(ClipLoss):
    """alpha * two-way InfoNCE (summed) + beta * in-modality separation; see the module doc."""

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, separate_image: bool = True,
                 separate_text: bool = True, semantic: bool = False,
                 rescale_ablation: bool = False, local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0,
                 world_size: int = 1, use_horovod: bool = False):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod)
        if semantic and rescale_ablation:
            raise ValueError("semantic supervision and the rescale ablation exclude each other")
        self.alpha, self.beta = alpha, beta
        self.separate_image, self.separate_text = separate_image, separate_text
        self.semantic, self.rescale_ablation = semantic, rescale_ablation

    @property
    def needs_sentence_features(self) -> bool:
        return self.semantic and self.beta != 0 and (self.separate_image or self.separate_text)

    def _gather(self, *features):
        if self.world_size == 1:
            return features
        kw = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                  rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod)
        return gather_features(*features, **kw)

    def forward(self, image_features, text_features, logit_scale, sentence_features=None,
                logit_bias=None, output_dict=False):
        if logit_bias is not None:
            raise ValueError("IMSepLoss is a softmax (CLIP) loss; the model has a logit_bias")
        all_image, all_text = self._gather(image_features, text_features)
        rows_image, rows_text = (image_features, text_features) if self.local_loss \
            else (all_image, all_text)
        labels = self.get_ground_truth(image_features.device, rows_image.shape[0])

        clip = (F.cross_entropy(logit_scale * rows_image @ all_text.T, labels) +
                F.cross_entropy(logit_scale * rows_text @ all_image.T, labels))

        separate = [(rows_image, all_image)] * self.separate_image + \
                   [(rows_text, all_text)] * self.separate_text
        imsep = clip.new_zeros(())
        if separate and self.beta != 0:
            dtype = torch.promote_types(image_features.dtype, torch.float32)
            distance = self._distance(sentence_features, labels, all_image.shape[0], dtype)
            paired = (rows_image * rows_text).sum(dim=-1)  # <I_i, T_i>
            positive = F.one_hot(labels, all_image.shape[0]).to(paired.dtype)
            for rows, columns in separate:
                sims = rows @ columns.T
                if distance is not None:
                    sims = sims * distance + positive * paired[:, None]
                imsep = imsep + F.cross_entropy(logit_scale * sims, labels)

        parts = {"clip_loss": self.alpha * clip, "imsep_loss": self.beta * imsep}
        return parts if output_dict else parts["clip_loss"] + parts["imsep_loss"]

    def _distance(self, sentence_features, labels, num_columns, dtype):
        """D (rows x columns): 1 - S S^T, hollow ones for the ablation, None for plain;
        in float32 at least (float64 features keep float64)."""
        if self.rescale_ablation:
            return 1 - F.one_hot(labels, num_columns).to(dtype)
        if not self.semantic:
            return None
        if sentence_features is None:
            raise ValueError("IMSepLoss(semantic=True) needs sentence_features (the caption "
                             "embeddings of the batch)")
        sentences = F.normalize(sentence_features.to(dtype), dim=-1)
        with torch.no_grad():
            all_sentences, _ = self._gather(sentences, sentences)
        rows = sentences if self.local_loss else all_sentences
        return 1 - rows @ all_sentences.T
