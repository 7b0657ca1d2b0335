"""ComAlign's image regions, their component views and CLIP image embeddings
(docs/methods/comalign.md).

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
The detector source lives in algorithms/comalign/detector.py, imported only when asked for
(algorithms/comalign/data.py region_source).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from algorithms.comalign.head import NUM_ENTITIES, NUM_RELATIONS
from common.readers import read_coco_instances

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
        self.images, self.by_id = read_coco_instances(instances_json)

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
        return {"source": self.name, "file": file_fingerprint(self.path)}


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
        return {"source": self.name, "file": file_fingerprint(self.path)}


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


def file_fingerprint(path) -> str:
    st = os.stat(path)
    return f"{Path(path).name}:{st.st_size}:{int(st.st_mtime)}"


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
