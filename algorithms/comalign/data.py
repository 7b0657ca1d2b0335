"""ComAlign's data: image-caption pairs for training and retrieval, compositional test
sets, and their component embeddings through the HDF5 cache (algorithms/comalign/cache.py).
The files are read by common/readers.py (one reader per format, shared with the
pretraining evaluation); here they become sets.

Pair sets (SPEC `TYPE:PATH[,KEY=VALUE...]`):
  pairs:CSV[,sep=TAB][,img=filepath][,caption=title]   CSV/TSV of (image path, caption)
                                   rows (open_clip_train's format; the generated pairs);
                                   rows of one image are its captions; relative image
                                   paths are relative to the CSV's folder
  world:ROOT                       the generated dataset's pairs/val.csv (split=train: train.csv)
  coco:CAPTIONS_JSON,images=DIR    COCO captions (val2017: 5,000 images, first 5 captions each)
  karpathy:JSON,images=DIR[,split=test]
                                   Karpathy splits (dataset_coco.json: 5k test;
                                   dataset_flickr30k.json: 1k test), first 5 captions
  wds:SHARDS                       webdataset tar shards (brace pattern) of <key>.{png,jpg}
                                   + <key>.txt; extracted once under the cache folder
Compositional sets:
  sugarcrepe:DIR,images=DIR        SugarCrepe's JSONs (add_att, add_obj, replace_att,
                                   replace_obj, replace_rel, swap_att, swap_obj; those present)
  worldcomp:ROOT                   the generated compositional set (SugarCrepe-shaped)
  aro:JSON,images=DIR[,name=vg_relation]
                                   ARO VG-Relation / VG-Attribution JSON (image_path, bbox_x/y/w/h,
                                   true_caption, false_caption); images cropped to the box as
                                   ARO does, crops written once under the cache folder
Every option takes a name=NAME too. Bad input: common.readers.DataError, one line.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from algorithms import backbone
from algorithms.comalign.cache import (CACHE_FORMAT, ComponentCache, cached_or_compute,
                                       items_fingerprint)
from algorithms.comalign.head import NUM_ENTITIES, NUM_RELATIONS
from algorithms.comalign.phrases import (encode_text_components, parser_backend,
                                         parser_description)
from algorithms.comalign.regions import (BoxesFileRegions, CocoRegions, FilledRegions,
                                         GridRegions, MaskRegions, encode_image_files)
from algorithms.core.feature_cache import tensors_fingerprint
from common import env, readers
from common.files import write_atomic
from common.paths import DATA
from common.readers import SUGARCREPE_SUBSETS, DataError

PAIR_TYPES = ("pairs", "world", "coco", "karpathy", "wds")
COMPOSITIONAL_TYPES = ("sugarcrepe", "worldcomp", "aro")
CAPTIONS_PER_IMAGE = 5


def region_source(spec: str, device="cpu"):
    """From a string: grid | mask | mask+grid | coco:FILE | boxes:FILE | detector:FILE
    (each optionally '+grid' to top up with grid boxes)."""
    fill = spec.endswith("+grid")
    base = spec[:-len("+grid")] if fill else spec
    kind, _, arg = base.partition(":")

    def detector():
        from algorithms.comalign.detector import DetectorRegions
        return DetectorRegions(arg, device=device)

    src = {"grid": lambda: GridRegions(), "mask": lambda: MaskRegions(),
           "coco": lambda: CocoRegions(arg), "boxes": lambda: BoxesFileRegions(arg),
           "detector": detector}.get(kind)
    if src is None:
        raise ValueError(f"unknown region source {spec!r}")
    src = src()
    return FilledRegions(src) if fill and kind != "grid" else src



@dataclass
class PairSet:
    name: str
    images: List[str]
    captions: List[str]
    caption_image: List[int]  # caption -> image index

    def image_captions(self) -> List[List[int]]:
        out = [[] for _ in self.images]
        for t, i in enumerate(self.caption_image):
            out[i].append(t)
        return out


@dataclass
class CompositionalSet:
    name: str
    images: List[str]
    positives: List[str]
    negatives: List[str]
    item_image: List[int]
    subset: List[str] = field(default_factory=list)


def _group(name, rows, limit=None) -> PairSet:
    """(image, caption) rows -> PairSet: images in first-seen order, at most `limit`
    captions each (the first ones)."""
    images, index, caps, owner = [], {}, [], []
    per = {}
    for path, caption in rows:
        if path not in index:
            index[path] = len(images)
            images.append(path)
        i = index[path]
        if limit and per.get(i, 0) >= limit:
            continue
        per[i] = per.get(i, 0) + 1
        caps.append(caption)
        owner.append(i)
    return PairSet(name, images, caps, owner)


def _expand_braces(pattern: str) -> List[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    return [pattern[:m.start()] + str(k).zfill(len(a)) + pattern[m.end():]
            for k in range(int(a), int(b) + 1)]


def read_webdataset(pattern: str, name="wds") -> PairSet:
    shards = _expand_braces(pattern)
    h = hashlib.sha256(pattern.encode())
    for shard in shards:  # extracted files are named by the shards' sizes and times too
        try:
            st = Path(shard).stat()
        except FileNotFoundError:
            raise DataError(f"{shard}: no such file (webdataset shard)") from None
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    out = Path(env.cache_root() or DATA / "feature_cache") / "comalign_wds" / h.hexdigest()[:16]
    rows = []
    for shard in shards:
        try:
            tar = tarfile.open(shard)
        except tarfile.TarError as e:
            raise DataError(f"{shard}: not a tar file (webdataset shard): {e}") from None
        with tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for mname, m in sorted(members.items()):
                stem, _, ext = mname.rpartition(".")
                if ext not in ("png", "jpg", "jpeg"):
                    continue
                txt = members.get(stem + ".txt")
                if txt is None:
                    continue
                target = out / mname
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data = tar.extractfile(m).read()  # whole or absent: never half a file
                    write_atomic(target, lambda tmp: tmp.write_bytes(data))
                rows.append((str(target), tar.extractfile(txt).read().decode().strip()))
    return _group(name, rows)


def load_pairs(spec: str) -> PairSet:
    s = readers.parse_spec(spec, PAIR_TYPES, what="pair set")
    path, o = s.path, s.options
    if s.type == "pairs":
        pairs = _group(o.get("name", Path(path).stem), readers.read_caption_csv(
            path, o.get("sep"), o.get("img", "filepath"), o.get("caption", "title"),
            relative_to=Path(path).parent))
    elif s.type == "world":
        split = o.get("split", "val")
        csv_path = Path(path) / "pairs" / f"{split}.csv"
        pairs = _group(o.get("name", f"world_{split}"),
                       readers.read_caption_csv(csv_path, relative_to=csv_path.parent))
    elif s.type == "coco":
        pairs = _group(o.get("name", "coco_val2017"),
                       readers.read_coco_captions(path, s.need("images")), CAPTIONS_PER_IMAGE)
    elif s.type == "karpathy":
        split = o.get("split", "test")
        pairs = _group(o.get("name", f"{Path(path).stem}_{split}"),
                       readers.read_karpathy(path, s.need("images"), split), CAPTIONS_PER_IMAGE)
    else:
        pairs = read_webdataset(path, o.get("name", "wds"))
    if not pairs.captions:
        raise DataError(f"{spec!r}: no image-caption pairs")
    return pairs


def _sugarcrepe_like(name, files, images_dir) -> CompositionalSet:
    """SugarCrepe-shaped JSONs, one per subset."""
    images, index, pos, neg, owner, subset = [], {}, [], [], [], []
    for sub, f in files:
        for filename, caption, negative in readers.read_sugarcrepe(f):
            p = str(Path(images_dir) / filename)
            if p not in index:
                index[p] = len(images)
                images.append(p)
            pos.append(caption)
            neg.append(negative)
            owner.append(index[p])
            subset.append(sub)
    return CompositionalSet(name, images, pos, neg, owner, subset)


def _aro(path, images_dir, name) -> CompositionalSet:
    """ARO's VG-Relation / VG-Attribution; each image cropped to its box (as ARO's
    VG_Relation / VG_Attribution), crops kept under a folder named by the JSON's and the
    image folder's fingerprint."""
    items = readers.read_aro(path)
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(str(Path(images_dir).resolve()).encode())
    out = Path(env.cache_root() or DATA / "feature_cache") / "comalign_aro" / \
        f"{name}_{h.hexdigest()[:16]}"
    images, pos, neg, owner = [], [], [], []
    for k, item in enumerate(items):
        target = out / f"{k:06d}.png"
        if not target.is_file():
            x, y, w, h = item["box"]
            crop = readers.read_rgb(Path(images_dir) / item["image_path"]).crop((x, y, x + w, y + h))
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, lambda tmp: crop.save(tmp, format="PNG"))
        images.append(str(target))
        pos.append(item["true_caption"])
        neg.append(item["false_caption"])
        owner.append(k)
    return CompositionalSet(name, images, pos, neg, owner, [name] * len(pos))


def load_compositional(spec: str) -> CompositionalSet:
    s = readers.parse_spec(spec, COMPOSITIONAL_TYPES, what="compositional set")
    path, o = s.path, s.options
    if s.type == "sugarcrepe":
        files = [(sub, Path(path) / f"{sub}.json") for sub in SUGARCREPE_SUBSETS
                 if (Path(path) / f"{sub}.json").is_file()]
        if not files:
            raise DataError(f"{spec!r}: none of SugarCrepe's {', '.join(SUGARCREPE_SUBSETS)} "
                            f"JSONs in {path}")
        comp = _sugarcrepe_like(o.get("name", "sugarcrepe"), files, s.need("images"))
    elif s.type == "worldcomp":
        root = Path(path)
        files = sorted((f.stem, f) for f in (root / "compositional").glob("*.json"))
        comp = _sugarcrepe_like(o.get("name", "world_compositional"), files, root)
    else:
        comp = _aro(path, s.need("images"), o.get("name", Path(path).stem))
    if not comp.positives:
        raise DataError(f"{spec!r}: no items")
    return comp


# --- encoding through the cache ---------------------------------------------------------------

@dataclass
class Encoder:
    """A frozen CLIP and the component settings; everything a cache key names."""
    clip_model: str
    clip_pretrained: str
    regions: str = "mask+grid"
    mode: str = "mask"
    parser: str = "auto"
    num_entities: int = NUM_ENTITIES
    num_relations: int = NUM_RELATIONS
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = False
    cache: Optional[ComponentCache] = field(default_factory=ComponentCache.from_env)

    def __post_init__(self):
        self.clip, self.tokenizer = backbone.load_clip(self.clip_model, self.clip_pretrained or None,
                                                       device=self.device)
        self.clip.requires_grad_(False)
        self.image_size = backbone.image_size_of(self.clip_model)
        self.transform = backbone.clip_transform(self.image_size, train=False)
        self.source = region_source(self.regions, self.device)
        self.weights = tensors_fingerprint(self.clip.state_dict().items())
        self.backend = parser_backend(self.parser)
        self.parser_name = parser_description(self.backend)  # spaCy: pipeline + version

    def _key(self, side, name, items, extra):
        return {"format": CACHE_FORMAT, "side": side, "clip_model": self.clip_model,
                "weights": self.weights, "num_entities": self.num_entities,
                "num_relations": self.num_relations,
                "data": {"name": name, "items": items_fingerprint(items), "n": len(items)}, **extra}

    def images(self, name: str, paths: List[str]) -> Dict[str, torch.Tensor]:
        key = self._key("image", name, paths, {"regions": self.source.describe(), "mode": self.mode,
                                               "image_size": self.image_size})
        return cached_or_compute(self.cache, key, lambda: encode_image_files(
            self.clip, paths, self.source, self.image_size, self.transform, self.mode,
            self.num_entities, self.num_relations, self.device, self.batch_size, self.progress),
            name=f"{name}: image components")

    def texts(self, name: str, captions: List[str]) -> Dict[str, torch.Tensor]:
        key = self._key("text", name, captions, {"parser": self.parser_name})
        return cached_or_compute(self.cache, key, lambda: encode_text_components(
            self.clip, self.tokenizer, captions, self.backend, self.num_entities,
            self.num_relations, self.device), name=f"{name}: text components")

    def meta(self) -> dict:
        return {"clip_model": self.clip_model, "clip_pretrained": self.clip_pretrained,
                "regions": self.regions, "component_mode": self.mode, "parser": self.backend,
                "parser_model": self.parser_name,
                "num_entities": self.num_entities, "num_relations": self.num_relations}
