"""ComAlign's network, similarities, fusions and training loss (user documentation:
docs/methods/comalign.md; the method: algorithms/comalign/method.py).

Notation. An image i has entity components I^e_i [n, D] (n = 10 slots), relation
components I^r_i [m, D] (m = 10 slots), each with a validity mask (padding), and a
global CLIP embedding g_i; a caption t has phrase embeddings T^e_t, T^r_t (same
counts, masks) and its global CLIP text embedding u_t. All vectors are L2-normalised
before any similarity (zero / padded vectors stay zero).

Head (reference `RetrievalModel`, aliabdollahi024/ComAlign inference.py): the 21-token
sequence [I^e (10), I^r (10), g] goes through a shared Linear(D, D)+ReLU, sinusoidal
positions (the reference's formula: angle(p, j) = p / 10000^(2j/D), cos on even j, sin
on odd j; dropout 0.1), and a 2-layer TransformerEncoder (d_model D, 4 heads,
feed-forward 512 (the reference's: D), dropout 0.1, batch_first, post-norm). Outputs:
20 refined components and the refined global token c_i. D = 512 for ViT-B/32; the CLIP
embed dim otherwise. The reference's unused `bottleneck_encoder` is left out. Harness's
own: padded slots are passed as `src_key_padding_mask` (the reference feeds zero vectors
unmasked; `padding_mask=False` does that). The released checkpoint (feed-forward D, no
mask) loads through `load_head_checkpoint` (mapping: algorithms/comalign/released.py).
The text-side head (an option) is the same network
over [T^e, T^r, u]; the reference's text branch is broken (undefined name), so its
use here is the harness's.

MaxSim (Chamfer; reference `get_similarity_matrix_single_caption`), per component kind:
    cross[i, t, p, k] = <I_p, T_k>
    s_I2T(i, t) = mean_{valid p} max_{valid k} cross        (each image component's best text one)
    s_T2I(i, t) = mean_{valid k} max_{valid p} cross        (each text component's best image one)
Empty sets score 0. The reference keeps padded (zero) slots in the max and the mean
(a zero contributes 0 to the max and divides the mean by 10); here padding is masked.

Score matrices, all [N_images, N_texts]:
    G = g u^T (plain CLIP),  C = c u^T (refined global token),
    F_I2T = E_I2T + rel_coef R_I2T,  F_T2I = E_T2I + rel_coef R_T2I  (rel_coef 1).

Fusions (`FUSIONS`):
- "released" (inference.py): every matrix divided by |mean over queries of the
  per-query max| (G, C, F_I2T: image queries; F_T2I: text queries), then
      T2I = 10 G + F_T2I + C,      I2T = 2 G + 0.06 C + 0.06 F_I2T + 0.02 F_T2I;
- "figure_mean" (paper figure): the plain mean of global, entity and relational
  similarity, direction-wise: T2I = (C + E_T2I + R_T2I) / 3, I2T = (C + E_I2T + R_I2T) / 3
  (C is the global similarity of the head's global token; with the identity head C = G);
- "clip": G alone (plain CLIP).
Terms with weight 0 are skipped, so with the identity head and every component weight 0
(`Fusion.clip_only()`) the fused score is exactly CLIP's.

Training loss (the harness's recipe; the reference publishes none): per term X in
{C, E, R} a symmetric InfoNCE over the batch, logits X / temperature, with E = (E_I2T +
E_T2I) / 2 and R likewise (symmetric Chamfer), rows/columns without any valid
component left out of that term:
    L = w_global CE(C) + w_entity CE(E) + w_relation CE(R),   defaults 1, 1, 1, tau 0.07.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.retrieval import RecallCounter

HEAD_FORMAT = "comalign-head-v1"
EPS = 1e-8
NUM_ENTITIES = 10   # entity slots per image / caption
NUM_RELATIONS = 10  # relation slots


# --- head -----------------------------------------------------------------------------

class SinusoidalPositions(nn.Module):
    def __init__(self, length: int, dim: int, dropout: float = 0.1):
        super().__init__()
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        j = torch.arange(dim, dtype=torch.float64)[None, :]
        angles = pos / (10000 ** (2 * j / dim))
        enc = torch.zeros(1, length, dim, dtype=torch.float64)
        enc[0, :, 0::2] = torch.cos(angles[:, 0::2])
        enc[0, :, 1::2] = torch.sin(angles[:, 1::2])
        self.register_buffer("encodings", enc.float())
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(x + self.encodings[:, :x.shape[1]])


@dataclass
class HeadConfig:
    dim: int = 512
    num_entities: int = NUM_ENTITIES
    num_relations: int = NUM_RELATIONS
    heads: int = 4
    feedforward: int = 512
    layers: int = 2
    dropout: float = 0.1
    padding_mask: bool = True

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ComAlignHead(nn.Module):
    """The lightweight encoder over [entities, relations, global] (see module docstring)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        c = config
        self.bottleneck = nn.Sequential(nn.Linear(c.dim, c.dim), nn.ReLU())
        self.positions = SinusoidalPositions(c.num_entities + c.num_relations + 1, c.dim,
                                             c.dropout)
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, dim_feedforward=c.feedforward,
                                           dropout=c.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)

    def forward(self, entities, relations, global_, entity_mask=None, relation_mask=None):
        n = entities.shape[1]
        x = torch.cat([entities, relations, global_[:, None]], dim=1)
        x = self.positions(self.bottleneck(x))
        pad = None
        if self.config.padding_mask and entity_mask is not None:
            valid = torch.cat([entity_mask, relation_mask,
                               torch.ones_like(entity_mask[:, :1])], dim=1)
            pad = ~valid.bool()
        y = self.encoder(x, src_key_padding_mask=pad)
        return y[:, :n], y[:, n:-1], y[:, -1]


class IdentityHead(nn.Module):
    """No checkpoint: components and global token pass unchanged (C = G)."""

    def forward(self, entities, relations, global_, entity_mask=None, relation_mask=None):
        return entities, relations, global_


def load_head_checkpoint(path, device="cpu") -> Tuple[nn.Module, nn.Module, dict]:
    """(image head, text head, checkpoint dict) of an algorithms.comalign.train checkpoint or
    of the released `RetrievalModel` state dict (algorithms/comalign/released.py; text head:
    the identity). weights_only; a layout problem is one line naming the first bad key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ComAlign checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, foreign or unsafe pickle
        from algorithms.backbone import checkpoint_problem
        raise ValueError(f"{path}: cannot read as a ComAlign head checkpoint "
                         f"({checkpoint_problem(e)})") from None
    from algorithms.comalign import released
    if released.is_released_layout(ckpt):
        image_head, info = released.released_head(ckpt, path, device)
        return image_head, IdentityHead(), info
    if not isinstance(ckpt, dict) or ckpt.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}: not a ComAlign head checkpoint ({HEAD_FORMAT}, or the "
                         f"released RetrievalModel state dict)")
    config = HeadConfig(**ckpt["head_config"])
    image_head = ComAlignHead(config).to(device)
    image_head.load_state_dict(ckpt["image_head"])
    text_head: nn.Module = IdentityHead()
    if ckpt.get("text_head") is not None:
        text_head = ComAlignHead(config).to(device)
        text_head.load_state_dict(ckpt["text_head"])
    return image_head.eval(), text_head.eval(), ckpt


# --- embeddings -------------------------------------------------------------------------

@dataclass
class Side:
    """One modality's embeddings: global [N, D], entities [N, n, D], relations [N, m, D],
    masks [N, n] / [N, m] (bool)."""
    global_: torch.Tensor
    entities: torch.Tensor
    entity_mask: torch.Tensor
    relations: torch.Tensor
    relation_mask: torch.Tensor

    def __len__(self):
        return self.global_.shape[0]

    def slice(self, sl) -> "Side":
        return Side(self.global_[sl], self.entities[sl], self.entity_mask[sl],
                    self.relations[sl], self.relation_mask[sl])

    def to(self, device) -> "Side":
        return Side(*(t.to(device) for t in (self.global_, self.entities, self.entity_mask,
                                              self.relations, self.relation_mask)))

    def normalised(self) -> "Side":
        n = lambda x: F.normalize(x, dim=-1)  # zero (padded) vectors stay zero
        em, rm = self.entity_mask.bool(), self.relation_mask.bool()
        return Side(n(self.global_), n(self.entities) * em[..., None], em,
                    n(self.relations) * rm[..., None], rm)

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor], prefix: str = "") -> "Side":
        g = lambda k: t[prefix + k]
        return cls(g("global").float(), g("entities").float(), g("entity_mask").bool(),
                   g("relations").float(), g("relation_mask").bool())


def refine(head: nn.Module, side: Side) -> Tuple[Side, torch.Tensor]:
    """(refined components with the same masks, refined global token). Normalised."""
    ent, rel, glob = head(side.entities, side.relations, side.global_,
                          side.entity_mask, side.relation_mask)
    out = Side(glob, ent, side.entity_mask, rel, side.relation_mask).normalised()
    return out, out.global_


# --- MaxSim -----------------------------------------------------------------------------

def _maxsim_from_cross(cross, a_mask, b_mask):
    """cross [..., p, k] with masks broadcastable to [..., p, 1] / [..., 1, k]."""
    neg = torch.finfo(cross.dtype).min
    a_m, b_m = a_mask[..., :, None], b_mask[..., None, :]
    best_over_b = cross.masked_fill(~b_m, neg).amax(dim=-1)               # [..., p]
    best_over_a = cross.masked_fill(~a_m, neg).amax(dim=-2)               # [..., k]
    pa, pb = a_mask.to(cross.dtype), b_mask.to(cross.dtype)
    has_b, has_a = b_mask.any(dim=-1, keepdim=True), a_mask.any(dim=-1, keepdim=True)
    s_ab = (torch.where(has_b, best_over_b, 0.0) * pa).sum(-1) / pa.sum(-1).clamp(min=1)
    s_ba = (torch.where(has_a, best_over_a, 0.0) * pb).sum(-1) / pb.sum(-1).clamp(min=1)
    return s_ab, s_ba


def maxsim(a, a_mask, b, b_mask) -> Tuple[torch.Tensor, torch.Tensor]:
    """a [Na, p, D], b [Nb, k, D] (normalised), masks bool. Returns (s_ab, s_ba), both
    [Na, Nb]: s_ab = mean over a's valid components of the max over b's valid ones;
    s_ba = mean over b's valid components of the max over a's valid ones."""
    cross = torch.einsum("apd,bkd->abpk", a, b)
    return _maxsim_from_cross(cross, a_mask.bool()[:, None, :], b_mask.bool()[None, :, :])


def maxsim_aligned(a, a_mask, b, b_mask) -> Tuple[torch.Tensor, torch.Tensor]:
    """As maxsim for the pairs (a[i], b[i]) only: [N] each."""
    cross = torch.einsum("npd,nkd->npk", a, b)
    return _maxsim_from_cross(cross, a_mask.bool(), b_mask.bool())


@dataclass
class Similarities:
    """Score matrices [N_images, N_texts] (see module docstring)."""
    G: torch.Tensor
    C: torch.Tensor
    E_i2t: torch.Tensor
    E_t2i: torch.Tensor
    R_i2t: torch.Tensor
    R_t2i: torch.Tensor
    rel_coef: float = 1.0

    def term(self, name: str) -> torch.Tensor:
        if name == "F_i2t":
            return self.E_i2t + self.rel_coef * self.R_i2t
        if name == "F_t2i":
            return self.E_t2i + self.rel_coef * self.R_t2i
        return getattr(self, name)


TERMS = ("G", "C", "F_i2t", "F_t2i", "E_i2t", "E_t2i", "R_i2t", "R_t2i")
TEXT_QUERY_TERMS = ("F_t2i", "E_t2i", "R_t2i")  # normalised over text queries


def similarities(images: Side, image_global_refined: torch.Tensor, texts: Side,
                 rel_coef: float = 1.0, need_components: bool = True) -> Similarities:
    """images/texts normalised (texts possibly refined by a text head)."""
    G = images.global_ @ texts.global_.T
    C = image_global_refined @ texts.global_.T
    if need_components:
        e_i2t, e_t2i = maxsim(images.entities, images.entity_mask, texts.entities, texts.entity_mask)
        r_i2t, r_t2i = maxsim(images.relations, images.relation_mask, texts.relations,
                              texts.relation_mask)
    else:
        e_i2t = e_t2i = r_i2t = r_t2i = torch.zeros_like(G)
    return Similarities(G, C, e_i2t, e_t2i, r_i2t, r_t2i, rel_coef)


# --- fusions ----------------------------------------------------------------------------

@dataclass
class Fusion:
    name: str
    t2i: Dict[str, float]
    i2t: Dict[str, float]
    normalise: bool = False
    rel_coef: float = 1.0

    def terms(self):
        return sorted({k for k, w in (*self.t2i.items(), *self.i2t.items()) if w != 0})

    def needs_components(self) -> bool:
        return any(t not in ("G", "C") for t in self.terms())

    @classmethod
    def clip_only(cls) -> "Fusion":
        return cls("clip", {"G": 1.0}, {"G": 1.0})


FUSIONS: Dict[str, Fusion] = {
    "released": Fusion("released", {"G": 10.0, "F_t2i": 1.0, "C": 1.0},
                       {"G": 2.0, "C": 0.06, "F_i2t": 0.06, "F_t2i": 0.02}, normalise=True),
    "figure_mean": Fusion("figure_mean", {"C": 1 / 3, "E_t2i": 1 / 3, "R_t2i": 1 / 3},
                          {"C": 1 / 3, "E_i2t": 1 / 3, "R_i2t": 1 / 3}),
    "clip": Fusion.clip_only(),
}


def get_fusion(fusion) -> Fusion:
    if isinstance(fusion, Fusion):
        return fusion
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; known: {sorted(FUSIONS)}")
    return FUSIONS[fusion]


def query_max(matrix: torch.Tensor, term: str) -> torch.Tensor:
    """Per-query maxima of an [I, T] matrix: over texts per image, or over images per
    text for the text-query terms."""
    return matrix.amax(dim=0) if term in TEXT_QUERY_TERMS else matrix.amax(dim=1)


def normalisers_from_maxima(sums: Dict[str, float], counts: Dict[str, int]) -> Dict[str, float]:
    """The reference's scalar per matrix: |mean over queries of the per-query max|."""
    out = {}
    for term, total in sums.items():
        value = abs(total / max(counts[term], 1))
        out[term] = value if value > EPS else 1.0
    return out


def reference_normalisers(sims: Similarities, fusion: Fusion) -> Dict[str, float]:
    sums, counts = {}, {}
    for term in fusion.terms():
        m = query_max(sims.term(term), term)
        sums[term], counts[term] = float(m.double().sum()), m.numel()
    return normalisers_from_maxima(sums, counts)


def fuse(sims: Similarities, fusion, direction: str,
         normalisers: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """Fused [I, T] scores for ranking in `direction` ("t2i" or "i2t"). `normalisers`
    (term -> scalar) default to the reference's when the fusion normalises."""
    fusion = get_fusion(fusion)
    sims.rel_coef = fusion.rel_coef
    weights = fusion.t2i if direction == "t2i" else fusion.i2t
    if fusion.normalise and normalisers is None:
        normalisers = reference_normalisers(sims, fusion)
    out = None
    for term, w in weights.items():
        if w == 0:
            continue
        m = sims.term(term)
        if fusion.normalise:
            m = m / normalisers[term]
        part = m if w == 1 else w * m
        out = part if out is None else out + part
    return out if out is not None else torch.zeros_like(sims.G)


# --- training loss ------------------------------------------------------------------------

@dataclass
class LossWeights:
    global_: float = 1.0
    entity: float = 1.0
    relation: float = 1.0
    temperature: float = 0.07


def _symmetric_ce(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tau: float):
    """InfoNCE both ways over a square [B, B] matrix, only pairs i whose image (rows) and
    caption (cols) both have components; None when none."""
    keep = (rows & cols).nonzero().flatten()
    if keep.numel() == 0:
        return None
    logits = scores / tau
    i2t = F.cross_entropy(logits[keep], keep)
    t2i = F.cross_entropy(logits.T[keep], keep)
    return (i2t + t2i) / 2


def contrastive_loss(images: Side, image_global_refined: torch.Tensor, texts: Side,
                     weights: LossWeights) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The harness's symmetric contrastive loss (module docstring); batch i <-> i."""
    sims = similarities(images, image_global_refined, texts,
                        need_components=weights.entity != 0 or weights.relation != 0)
    B = sims.G.shape[0]
    all_ = torch.ones(B, dtype=torch.bool, device=sims.G.device)
    parts = {"global": (weights.global_, sims.C, all_, all_),
             "entity": (weights.entity, (sims.E_i2t + sims.E_t2i) / 2,
                        images.entity_mask.any(1), texts.entity_mask.any(1)),
             "relation": (weights.relation, (sims.R_i2t + sims.R_t2i) / 2,
                          images.relation_mask.any(1), texts.relation_mask.any(1))}
    total, logs = sims.G.new_zeros(()), {}
    for name, (w, scores, rows, cols) in parts.items():
        if w == 0:
            continue
        ce = _symmetric_ce(scores, rows, cols, weights.temperature)
        if ce is not None:
            total = total + w * ce
            logs[f"loss_{name}"] = float(ce.detach())
    logs["loss"] = float(total.detach())
    return total, logs


# --- chunked scoring (retrieval over 5k x 25k in bounded memory) ---------------------------

def _chunk_sims(images: Side, token, texts: Side, fusion: Fusion, isl, tsl) -> Similarities:
    return similarities(images.slice(isl), token[isl], texts.slice(tsl), fusion.rel_coef,
                        fusion.needs_components())


def chunked_normalisers(images: Side, token, texts: Side, fusion, image_chunk=1000,
                        text_chunk=1000) -> Dict[str, float]:
    """The reference normalisers (|mean over queries of the per-query max|), computed
    chunk by chunk: running per-image maxima over text chunks, per-text maxima over
    image chunks."""
    fusion = get_fusion(fusion)
    I, T = len(images), len(texts)
    terms = fusion.terms()
    img_max = {t: torch.full((I,), -float("inf"), device=token.device) for t in terms
               if t not in TEXT_QUERY_TERMS}
    sums = {t: 0.0 for t in terms if t in TEXT_QUERY_TERMS}
    for t0 in range(0, T, text_chunk):
        tsl = slice(t0, min(T, t0 + text_chunk))
        txt_max = {t: None for t in sums}
        for i0 in range(0, I, image_chunk):
            isl = slice(i0, min(I, i0 + image_chunk))
            sims = _chunk_sims(images, token, texts, fusion, isl, tsl)
            for t in terms:
                m = sims.term(t)
                if t in img_max:
                    img_max[t][isl] = torch.maximum(img_max[t][isl], m.amax(dim=1))
                else:
                    c = m.amax(dim=0)
                    txt_max[t] = c if txt_max[t] is None else torch.maximum(txt_max[t], c)
        for t in sums:
            sums[t] += float(txt_max[t].double().sum())
    totals = {**{t: float(v.double().sum()) for t, v in img_max.items()}, **sums}
    counts = {t: (T if t in TEXT_QUERY_TERMS else I) for t in terms}
    return normalisers_from_maxima(totals, counts)


@torch.no_grad()
def chunked_retrieval(images: Side, token, texts: Side, text_to_image: torch.Tensor, fusion,
                      ks=(1, 5, 10), image_chunk=1000, text_chunk=1000) -> Dict[str, Dict[str, float]]:
    """Recall@k (in %) both ways of the fused scores (common/retrieval.py: the rule, ties
    count against the query), never holding more than an [I, text_chunk] score matrix
    and one [image_chunk, text_chunk, n, m] cross tensor. images/texts normalised (and
    refined); token = refined global token; text_to_image[t] = caption t's image."""
    fusion = get_fusion(fusion)
    I, T = len(images), len(texts)
    caption_image = text_to_image.to(token.device)
    normalisers = (chunked_normalisers(images, token, texts, fusion, image_chunk, text_chunk)
                   if fusion.normalise else None)
    image_to_text = RecallCounter(I, max(ks), token.device)
    text_to_image = RecallCounter(T, max(ks), token.device)
    image_ids = torch.arange(I, device=token.device)
    for t0 in range(0, T, text_chunk):
        tsl = slice(t0, min(T, t0 + text_chunk))
        cols_t2i, cols_i2t = [], []
        for i0 in range(0, I, image_chunk):
            isl = slice(i0, min(I, i0 + image_chunk))
            sims = _chunk_sims(images, token, texts, fusion, isl, tsl)
            cols_t2i.append(fuse(sims, fusion, "t2i", normalisers))
            cols_i2t.append(fuse(sims, fusion, "i2t", normalisers))
        s_t2i, s_i2t = torch.cat(cols_t2i), torch.cat(cols_i2t)          # [I, tc]
        right = caption_image[tsl][None, :] == image_ids[:, None]        # [I, tc]
        text_to_image.add(s_t2i.T, right.T, rows=tsl)
        image_to_text.add(s_i2t, right)
    return {"image_to_text": image_to_text.recalls(ks),
            "text_to_image": text_to_image.recalls(ks)}


@torch.no_grad()
def aligned_scores(images: Side, token, texts: Side, fusion, direction="i2t",
                   normalisers: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """Fused score of each pair (images[i], texts[i]): [N]. For compositional tests
    (an image against its positive and its negative caption)."""
    fusion = get_fusion(fusion)
    G = (images.global_ * texts.global_).sum(-1)
    C = (token * texts.global_).sum(-1)
    if fusion.needs_components():
        e = maxsim_aligned(images.entities, images.entity_mask, texts.entities, texts.entity_mask)
        r = maxsim_aligned(images.relations, images.relation_mask, texts.relations, texts.relation_mask)
    else:
        e = r = (torch.zeros_like(G), torch.zeros_like(G))
    sims = Similarities(G[:, None], C[:, None], e[0][:, None], e[1][:, None], r[0][:, None],
                        r[1][:, None])
    if fusion.normalise and normalisers is None:
        raise ValueError("a normalising fusion needs the set's normalisers")
    return fuse(sims, fusion, direction, normalisers)[:, 0]
