"""ComAlign's data: image-caption pairs for training and retrieval, compositional test
sets, and their component embeddings through the HDF5 cache
(algorithms/comalign_components.py).

Pair sets (SPEC `TYPE:PATH[,KEY=VALUE...]`):
  pairs:CSV[,sep=TAB][,img=filepath][,caption=title]   CSV/TSV of (image path, caption)
                                   rows (open_clip_train's format; the generated pairs);
                                   rows of one image are its captions
  world:ROOT                       the generated dataset's pairs/val.csv (train=... : train.csv)
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
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from algorithms import backbone
from algorithms.comalign_components import (ComponentCache, NUM_ENTITIES, NUM_RELATIONS,
                                            cached_or_compute, encode_image_files,
                                            encode_text_components, items_fingerprint,
                                            parser_backend, parser_description,
                                            region_source)
from algorithms.core.feature_cache import tensors_fingerprint
from common import env
from common.files import write_atomic
from common.paths import DATA

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                      "swap_att", "swap_obj")
CAPTIONS_PER_IMAGE = 5


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


def parse_spec(text: str):
    kind, _, rest = text.partition(":")
    parts = rest.split(",")
    opts = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    if not parts[0]:
        raise ValueError(f"{text!r}: no path (TYPE:PATH[,KEY=VALUE...])")
    return kind, parts[0], opts


def _option(opts: dict, key: str, spec: str) -> str:
    if key not in opts:
        raise ValueError(f"{spec!r} needs ,{key}=... (pretraining/comalign_data.py)")
    return opts[key]


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def _non_empty(pairs: PairSet, spec: str) -> PairSet:
    if not pairs.captions:
        raise ValueError(f"{spec!r}: no image-caption pairs")
    return pairs


def _group(name, rows, limit=None) -> PairSet:
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


def read_pairs_csv(path, sep=None, img="filepath", caption="title", name=None) -> PairSet:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty (needs a header row with columns {img!r} and "
                         f"{caption!r})")
    sep = sep or ("\t" if "\t" in text.splitlines()[0] else ",")
    sep = "\t" if sep in ("TAB", "tab", "\\t") else sep
    reader = csv.DictReader(io.StringIO(text), delimiter=sep)
    base = Path(path).parent
    rows = []
    try:
        cols = reader.fieldnames or []
        for key in (img, caption):
            if key not in cols:
                raise ValueError(f"{path}: no column {key!r} "
                                 f"(columns: {', '.join(map(repr, cols))})")
        for r in reader:
            if r[img] is None or r[caption] is None:
                raise ValueError(f"{path}:{reader.line_num}: a row without {img!r} or "
                                 f"{caption!r}")
            p = Path(r[img])
            rows.append((str(p if p.is_absolute() else base / p), r[caption]))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not CSV ({e})") from None
    return _group(name or Path(path).stem, rows)


def read_coco_captions(path, images_dir, name="coco_val2017") -> PairSet:
    """COCO captions JSON (captions_val2017.json: images[id, file_name],
    annotations[image_id, caption]); the first 5 captions of each image."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not COCO captions (needs lists 'images' and 'annotations')")
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        rows = []
        for a in data["annotations"]:
            if a["image_id"] not in files:
                raise ValueError(f"{path}: annotation for image_id {a['image_id']!r} not in "
                                 f"'images'")
            rows.append((str(Path(images_dir) / files[a["image_id"]]), a["caption"].strip()))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not COCO captions (an image needs 'id' and 'file_name', "
                         f"an annotation 'image_id' and a string 'caption'; "
                         f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None
    return _group(name, rows, CAPTIONS_PER_IMAGE)


def read_karpathy(path, images_dir, split="test", name=None) -> PairSet:
    """Karpathy's dataset_{coco,flickr30k}.json: images[filepath (COCO only), filename,
    split, sentences[raw]]; the images of `split`, first 5 sentences each."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy split file (needs a list 'images')")
    rows = []
    try:
        for im in data["images"]:
            if im.get("split") != split:
                continue
            p = Path(images_dir) / im.get("filepath", "") / im["filename"]
            rows += [(str(p), s["raw"].strip()) for s in im["sentences"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a Karpathy split file (an image needs 'filename', "
                         f"'split' and 'sentences' of {{'raw': string}}; "
                         f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None
    return _group(name or f"{Path(path).stem}_{split}", rows, CAPTIONS_PER_IMAGE)


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
            raise FileNotFoundError(f"webdataset shard not found: {shard}") from None
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    out = Path(env.cache_root() or DATA / "feature_cache") / "comalign_wds" / h.hexdigest()[:16]
    rows = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for mname, m in sorted(members.items()):
                stem, ext = mname.rsplit(".", 1)
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
    kind, path, o = parse_spec(spec)
    if kind == "pairs":
        pairs = read_pairs_csv(path, o.get("sep"), o.get("img", "filepath"),
                               o.get("caption", "title"), o.get("name"))
    elif kind == "world":
        pairs = read_pairs_csv(Path(path) / "pairs" / f"{o.get('split', 'val')}.csv",
                               name=o.get("name", f"world_{o.get('split', 'val')}"))
    elif kind == "coco":
        pairs = read_coco_captions(path, _option(o, "images", spec), o.get("name", "coco_val2017"))
    elif kind == "karpathy":
        pairs = read_karpathy(path, _option(o, "images", spec), o.get("split", "test"), o.get("name"))
    elif kind == "wds":
        pairs = read_webdataset(path, o.get("name", "wds"))
    else:
        raise ValueError(f"unknown pair set type {kind!r} in {spec!r} (pairs | world | coco | "
                         "karpathy | wds)")
    return _non_empty(pairs, spec)


def _sugarcrepe_like(name, files, images_dir) -> CompositionalSet:
    """SugarCrepe's JSONs ({"0": {filename, caption, negative_caption}, ...}), one per subset."""
    images, index, pos, neg, owner, subset = [], {}, [], [], [], []
    for sub, f in files:
        for item in _read_json(f).values():
            p = str(Path(images_dir) / item["filename"])
            if p not in index:
                index[p] = len(images)
                images.append(p)
            pos.append(item["caption"])
            neg.append(item["negative_caption"])
            owner.append(index[p])
            subset.append(sub)
    return CompositionalSet(name, images, pos, neg, owner, subset)


def _aro(path, images_dir, name) -> CompositionalSet:
    """ARO's visual_genome_{relation,attribution}.json: [{image_path, bbox_x, bbox_y,
    bbox_w, bbox_h, true_caption, false_caption, ...}]; each image cropped to its box
    (as ARO's VG_Relation / VG_Attribution), crops kept under a folder named by the JSON's
    and the image folder's fingerprint."""
    from PIL import Image
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: not an ARO VG-Relation/VG-Attribution file (a JSON list)")
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(str(Path(images_dir).resolve()).encode())
    out = Path(env.cache_root() or DATA / "feature_cache") / "comalign_aro" / \
        f"{name}_{h.hexdigest()[:16]}"
    images, pos, neg, owner = [], [], [], []
    for k, item in enumerate(data):
        target = out / f"{k:06d}.png"
        if not target.is_file():
            with Image.open(Path(images_dir) / item["image_path"]) as im:
                x, y, w, h = (item[f"bbox_{c}"] for c in "xywh")
                target.parent.mkdir(parents=True, exist_ok=True)
                crop = im.convert("RGB").crop((x, y, x + w, y + h))
                write_atomic(target, lambda tmp: crop.save(tmp, format="PNG"))
        images.append(str(target))
        pos.append(item["true_caption"])
        neg.append(item["false_caption"])
        owner.append(k)
    return CompositionalSet(name, images, pos, neg, owner, [name] * len(pos))


def load_compositional(spec: str) -> CompositionalSet:
    kind, path, o = parse_spec(spec)
    if kind == "sugarcrepe":
        files = [(s, Path(path) / f"{s}.json") for s in SUGARCREPE_SUBSETS
                 if (Path(path) / f"{s}.json").is_file()]
        if not files:
            raise ValueError(f"{spec!r}: none of SugarCrepe's {', '.join(SUGARCREPE_SUBSETS)} "
                             f"JSONs in {path}")
        comp = _sugarcrepe_like(o.get("name", "sugarcrepe"), files, _option(o, "images", spec))
    elif kind == "worldcomp":
        root = Path(path)
        files = sorted((f.stem, f) for f in (root / "compositional").glob("*.json"))
        comp = _sugarcrepe_like(o.get("name", "world_compositional"), files, root)
    elif kind == "aro":
        comp = _aro(path, _option(o, "images", spec), o.get("name", Path(path).stem))
    else:
        raise ValueError(f"unknown compositional set type {kind!r} in {spec!r} (sugarcrepe | "
                         "worldcomp | aro)")
    if not comp.positives:
        raise ValueError(f"{spec!r}: no items")
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
        return {"format": "comalign-components-v1", "side": side, "clip_model": self.clip_model,
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
