"""ComAlign (Abdollahi, Izadi et al., "ComAlign: Compositional Alignment in
Vision-Language Models", arXiv 2409.08206) as a classifier in the harness's protocols
(DomainBed, Dassl base-to-novel). User documentation: docs/methods/comalign.md.

Training-free inside a sweep (`trains = False`): the lightweight head comes from a
ComAlign checkpoint trained on image-caption pairs by `python -m
algorithms.comalign.train`, or the released `ComAlign-CLIP-VIT-B32.pt` (hparam
`comalign_checkpoint`; algorithms/comalign/released.py). With
`comalign_checkpoint: ""` (the default, needed to build without any file) the head is
the identity: the refined global token is CLIP's global embedding (C = G) and the
components are the frozen CLIP embeddings of the regions -- an untrained ComAlign, i.e.
CLIP plus the training-free component re-ranking of the chosen fusion.

Per image (preprocessed tensor, no annotations inside a sweep): regions = the first
`grid_regions` (default 5: left/right/top/bottom halves and the centre; up to 9 with
the quadrants) boxes of a fixed grid (algorithms/comalign/regions.py GridRegions),
ranked by area; 5 keeps the demo's cost at about 6 image passes per image; each embedded as the greyed-out (`component_mode: mask`,
default) or cropped view. Per class c: the global text embedding is the harness's
class embedding (template ensemble, as ZSCLIP) and the single entity phrase is the bare
class name (`entity_prompt`, default "{}": training phrases are bare attribute-noun
phrases); a class prompt has no relation phrase, so the relation terms are 0 and the
image's relation views are only computed when a trained head needs them as context.
Scores: algorithms/comalign/head.py similarities (G, C, F_I2T, F_T2I) over images x
classes, fused with the image-to-text weights of `fusion` ("released": 2 G + 0.06 C +
0.06 F_I2T + 0.02 F_T2I; "figure_mean": mean of C, E_I2T, R_I2T; "clip": G). The
released code divides each matrix by the mean over queries of the per-query max; a
classifier must not depend on its batch, so here each image's row is divided by its
own max (|max over classes|), the reference's normaliser for a single query. Logits
= logit_scale x fused. `fusion: clip` gives ZSCLIP's scores (up to float rounding).
"""
from __future__ import annotations

from typing import Dict

import torch

from algorithms.comalign.head import (EPS, IdentityHead, Side, get_fusion, load_head_checkpoint,
                                      refine, similarities)
from algorithms.comalign.released import RELEASED_FORMAT
from algorithms.comalign.regions import (GridRegions, clip_grey, encode_image_components,
                                         rank_components)
from algorithms.core.hparams import HParams, fixed
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


def comalign_hparams() -> HParams:
    hparams = dict(clip_hparams())
    hparams.update({
        "comalign_checkpoint": fixed(""),    # "" = identity head (untrained ComAlign)
        "fusion": fixed("released"),         # released | figure_mean | clip
        "component_mode": fixed("mask"),     # mask (greyed-out frame) | crop
        "entity_prompt": fixed("{}"),        # the class's entity phrase
        "num_entities": fixed(10),
        "num_relations": fixed(10),
        "grid_regions": fixed(5),            # grid boxes used: halves + centre (<= 9)
    })
    return hparams


@register_method
class ComAlign(CLIPMethod):
    """ComAlign classifier (see the module docstring)."""
    name = "ComAlign"
    trains = False
    frozen_modules = ("clip", "image_head", "text_head")

    @staticmethod
    def hparams() -> HParams:
        return comalign_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        device = self.class_embeddings.device
        self.fusion = get_fusion(cfg.fusion)
        self.num_entities, self.num_relations = cfg.num_entities, cfg.num_relations
        self.mode = cfg.component_mode
        self.checkpoint_meta: Dict = {}
        if cfg.comalign_checkpoint:
            image_head, text_head, ckpt = load_head_checkpoint(cfg.comalign_checkpoint, device)
            dim = self.class_embeddings.shape[1]
            if image_head.config.dim != dim:
                raise ValueError(f"{self.name}: checkpoint head dim {image_head.config.dim} != "
                                 f"CLIP {cfg.clip_model} embed dim {dim}")
            self.num_entities = image_head.config.num_entities
            self.num_relations = image_head.config.num_relations
            self.checkpoint_meta = dict(ckpt.get("meta", {}))
            trained_on = self.checkpoint_meta.get("clip_model")
            if trained_on and trained_on != cfg.clip_model:
                raise ValueError(f"{self.name}: checkpoint {cfg.comalign_checkpoint} was "
                                 f"trained on CLIP {trained_on}, not {cfg.clip_model}")
            self.mode = self.checkpoint_meta.get("component_mode", self.mode)
            if ckpt.get("format") == RELEASED_FORMAT:  # the file names no CLIP
                print(f"{self.name}: released head {cfg.comalign_checkpoint} (RetrievalModel, "
                      f"D {dim}, released for CLIP ViT-B-32 openai; views {self.mode})")
            else:
                print(f"{self.name}: trained head {cfg.comalign_checkpoint} (epoch "
                      f"{int(ckpt.get('epoch', -1)) + 1}, CLIP {trained_on} "
                      f"{self.checkpoint_meta.get('clip_pretrained') or 'random init'}, "
                      f"views {self.mode})")
        else:
            image_head, text_head = IdentityHead(), IdentityHead()
        self.image_head, self.text_head = image_head, text_head
        self.image_head.requires_grad_(False)
        self.text_head.requires_grad_(False)
        self.trained_head = not isinstance(image_head, IdentityHead)
        self.register_buffer("grey", clip_grey().to(device), persistent=False)
        with torch.no_grad():
            phrases = [cfg.entity_prompt.format(c) for c in self.classnames]
            ent = self.clip.encode_text(self.tokenizer(phrases).to(device)).float()
        C, D = ent.shape
        entities = torch.zeros(C, self.num_entities, D, device=device)
        entities[:, 0] = ent
        emask = torch.zeros(C, self.num_entities, dtype=torch.bool, device=device)
        emask[:, 0] = True
        text = Side(self.class_embeddings.float(), entities, emask,
                    torch.zeros(C, self.num_relations, D, device=device),
                    torch.zeros(C, self.num_relations, dtype=torch.bool, device=device))
        with torch.no_grad():
            refined, _ = refine(self.text_head, text)
        # the text global stays the class embedding (C uses CLIP's text, as the reference)
        self.text_side = Side(self.class_embeddings.float(), refined.entities, refined.entity_mask,
                              refined.relations, refined.relation_mask)

    def _ranked(self, size: int):
        grid = GridRegions().boxes(size, size)
        k = self.cfg.grid_regions
        grid.boxes, grid.scores = grid.boxes[:k], grid.scores[:k]
        eb, em, rp, rm = rank_components(grid, self.num_entities, self.num_relations)
        if not self.trained_head:
            rm = rm & False  # relation views only matter as a trained head's context
        return eb, em, rp, rm

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if not self.trained_head and not self.fusion.needs_components() and \
                set(self.fusion.terms()) <= {"G", "C"}:
            # identity head, no component term: C = G, CLIP's scores
            weight = sum(w for t, w in self.fusion.i2t.items() if t in ("G", "C"))
            return weight * super().predict(images) if weight != 1 else super().predict(images)
        ranked = [self._ranked(images.shape[-1])] * images.shape[0]
        comps = encode_image_components(self.clip, images, ranked, self.mode, self.grey,
                                        encode=lambda x: self.run_encoder(self.clip.encode_image, x))
        side = Side.from_tensors(comps).to(images.device)
        plain = side.normalised()
        refined, token = refine(self.image_head, side)
        refined.global_ = plain.global_
        sims = similarities(refined, token, self.text_side, self.fusion.rel_coef,
                            self.fusion.needs_components())
        fused = None
        for term, w in self.fusion.i2t.items():
            if w == 0:
                continue
            m = sims.term(term)
            if self.fusion.normalise:  # per-query (row) normaliser: batch-independent
                m = m / m.amax(dim=1, keepdim=True).abs().clamp(min=EPS)
            fused = w * m if fused is None else fused + w * m
        return self.logit_scale * fused
