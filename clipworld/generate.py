"""Generate the synthetic multi-domain, compositional image-text world (docs: docs/demo.md).

Deterministic synthetic multi-domain, compositional image-text "world".

Small coloured shapes drawn in four domains (photo, sketch, cartoon, painting),
with background clutter, optional second object + spatial relation, a caption,
and a foreground mask per image.  Written in several layouts:

  <root>/domainbed/clip_world/<domain>/<class_folder>/<i:05d>.png (+ _mask.npy)
  <root>/coop/oxford_pets/{images/,annotations/,split_zhou_OxfordPets.json}
  <root>/coop/clip_world/{images/<domain>/,split_clip_world.json}
  <root>/pairs/{train,val}.csv, <root>/pairs/shards/train-NNNNNN.tar, <root>/pairs/images/
  <root>/compositional/{replace_att,replace_obj,replace_rel}.json (+ images/)
  <root>/metadata.jsonl, <root>/WORLD_DONE.json (written last)

Every random draw comes from a sub-stream of SeedSequence(seed), keyed by what
is being drawn, so the same options give byte-identical files.
"""
import argparse
import io
import json
import math
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common import cli
from common.files import write_json_atomic

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(it, **_):
        return it


def _star(n=5, inner=0.42):
    pts = []
    for k in range(2 * n):
        rad, ang = (1.0 if k % 2 == 0 else inner), math.pi * k / n - math.pi / 2
        pts.append((rad * math.cos(ang), rad * math.sin(ang)))
    return pts


# Shapes in unit coordinates ([-1, 1]^2, y down): ("p", polygon) or
# ("e", ellipse bbox), with 1 = fill, 0 = cut out.  Names kept sorted so the
# class order equals the sorted folder order used by ImageFolder loaders.
_SHAPES = {
    "arrow": [("p", [(-1, -.3), (.2, -.3), (.2, -.75), (1, 0), (.2, .75), (.2, .3), (-1, .3)], 1)],
    "circle": [("e", (-1, -1, 1, 1), 1)],
    "cross": [("p", [(-.33, -1), (.33, -1), (.33, -.33), (1, -.33), (1, .33), (.33, .33),
                     (.33, 1), (-.33, 1), (-.33, .33), (-1, .33), (-1, -.33), (-.33, -.33)], 1)],
    "diamond": [("p", [(0, -1), (.7, 0), (0, 1), (-.7, 0)], 1)],
    "half moon": [("e", (-1, -1, 1, 1), 1), ("e", (-.5, -1.0, 1.2, .7), 0)],
    "heart": [("e", (-1, -.85, .05, .2), 1), ("e", (-.05, -.85, 1, .2), 1),
              ("p", [(-.97, -.2), (.97, -.2), (0, 1)], 1)],
    "ring": [("e", (-1, -1, 1, 1), 1), ("e", (-.55, -.55, .55, .55), 0)],
    "square": [("p", [(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)], 1)],
    "star": [("p", _star(), 1)],
    "triangle": [("p", [(0, -1), (.95, .75), (-.95, .75)], 1)],
}
CLASSES = tuple(_SHAPES)
DOMAINS = ("photo", "sketch", "cartoon", "painting")
PAIR_DOMAINS = DOMAINS[:3]  # painting is held out of the image-text pairs
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
           "yellow": (240, 210, 20), "purple": (140, 40, 180), "orange": (250, 130, 10)}
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
DOMAINBED_DIRNAME = "clip_world"
MARKER = "WORLD_DONE.json"
OWNED = ("domainbed", "coop", "pairs", "compositional", "metadata.jsonl")  # what we write
_VERSION = 3


def class_folder(name):
    return name.replace(" ", "_")


def _rng(seed, *key):
    """Independent sub-stream of SeedSequence(seed) named by an integer key."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ---------------------------------------------------------------- captions
def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def make_caption(f):
    """Caption from fields: domain, size, colour, class [, relation, second_*]."""
    if not f.get("size"):  # the short form: "a sketch of an arrow."
        return f"a {f['domain']} of {_article(f['class'])} {f['class']}."
    text = f"a {f['domain']} of a {f['size']} {f['colour']} {f['class']}"
    if f.get("relation"):
        c2 = f["second_colour"]
        text += f" {f['relation']} {_article(c2)} {c2} {f['second_class']}"
    return text + "."


def _alt(words):
    return "(" + "|".join(re.escape(w) for w in words) + ")"


_CAPTION_RE = re.compile(
    f"^a {_alt(DOMAINS)} of an? (?:{_alt(SIZES)} {_alt(COLOURS)} )?{_alt(CLASSES)}"
    f"(?: {_alt(RELATIONS)} an? {_alt(COLOURS)} {_alt(CLASSES)})?\\.$")


def caption_fields(caption):
    """Parse a caption back into its fields (inverse of make_caption)."""
    m = _CAPTION_RE.match(caption)
    if m is None:
        raise ValueError(f"not a world caption: {caption!r}")
    keys = ("domain", "size", "colour", "class", "relation", "second_colour", "second_class")
    return dict(zip(keys, m.groups()))


def pretraining_captions(f):
    """What the tiny CLIP is pretrained on for one image: its full caption and the
    short form naming only domain and class (the shape is the only cue that tells
    two short captions of one domain apart)."""
    return [make_caption(f), make_caption({"domain": f["domain"], "class": f["class"]})]


# ---------------------------------------------------------------- drawing
def _shape_mask(cls, cx, cy, r, s):
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    for kind, geom, fill in _SHAPES[cls]:
        if kind == "p":
            d.polygon([(cx + u * r, cy + v * r) for u, v in geom], fill=255 * fill)
        else:
            x0, y0, x1, y1 = geom
            d.ellipse((cx + x0 * r, cy + y0 * r, cx + x1 * r, cy + y1 * r), fill=255 * fill)
    return np.asarray(im) > 127


def _edge(m, k):
    """Pixels of m within k pixels of its border."""
    e = m
    for _ in range(k):
        p = np.pad(e, 1)
        e = e & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~e


def _strokes(rng, s, std):
    """Blocky low-frequency noise that looks like horizontal brush strokes."""
    small = rng.normal(0, std, (16, 6, 1)) + rng.normal(0, std / 3, (16, 6, 3))
    return np.repeat(np.repeat(small, -(-s // 16), 0), -(-s // 6), 1)[:s, :s]


def _background(domain, s, rng):
    if domain == "photo":
        a, b = rng.uniform(60, 230, (2, 3))
        t = np.linspace(0, 1, s)[:, None, None] * np.ones((1, s, 1))
        if rng.random() < 0.5:
            t = t.transpose(1, 0, 2)
        return a * (1 - t) + b * t + rng.normal(0, 6, (s, s, 3))
    if domain == "sketch":
        return np.full((s, s, 3), 255.0)
    if domain == "cartoon":
        return np.ones((s, s, 3)) * rng.uniform(170, 250, 3)
    return np.ones((s, s, 3)) * rng.uniform(80, 220, 3) + _strokes(rng, s, 30)


def _clutter(img, domain, rng):
    """A few small distractor lines and dots, drawn behind the objects."""
    s, d = img.size[0], ImageDraw.Draw(img)
    w = max(1, s // 64)
    for _ in range(int(rng.integers(3, 7))):
        col = (tuple([int(rng.integers(60, 160))] * 3) if domain == "sketch"
               else tuple(int(c) for c in rng.integers(0, 256, 3)))
        x, y = rng.uniform(0, s, 2)
        if rng.random() < 0.6:
            ln, ang = rng.uniform(0.08, 0.2) * s, rng.uniform(0, 2 * math.pi)
            d.line((x, y, x + ln * math.cos(ang), y + ln * math.sin(ang)), fill=col, width=w)
        else:
            rad = rng.uniform(0.01, 0.03) * s + 0.5
            d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=col)


def _paint(img, m, colour, domain, rng, cx, cy, r):
    s, col = img.shape[0], np.array(COLOURS[colour], float)
    if domain == "photo":  # shaded, textured fill lit from the top left
        yy, xx = np.mgrid[0:s, 0:s]
        shade = np.clip(1.1 - 0.3 * ((xx - cx) + (yy - cy)) / (2 * r), 0.6, 1.3)
        fill = col * shade[..., None] + rng.normal(0, 10, (s, s, 3))
        img[m] = fill[m]
    elif domain == "sketch":  # thin coloured outline only
        img[_edge(m, max(1, s // 32))] = col
    elif domain == "cartoon":  # flat fill, black outline
        img[m] = col
        img[_edge(m, max(1, s // 32))] = 0
    else:  # painting: streaky fill (blurred later)
        fill = col + _strokes(rng, s, 35)
        img[m] = fill[m]


def _place(spec, s, rng):
    """Centres and radii (main, second) honouring the spatial relation."""
    two = spec["relation"] is not None
    rad = lambda size: s * ((0.22 if size == "large" else 0.15) if two
                            else (0.40 if size == "large" else 0.28))
    r1 = rad(spec["size"])
    if not two:
        return [(*rng.uniform(r1 + 1, s - r1 - 1, 2), r1)]
    near, far = s * rng.uniform(0.24, 0.3), s * rng.uniform(0.7, 0.76)
    mid1, mid2 = s * rng.uniform(0.4, 0.6, 2)
    a, b = {"to the left of": (near, far), "to the right of": (far, near),
            "above": (near, far), "below": (far, near)}[spec["relation"]]
    horiz = spec["relation"].startswith("to the")
    c1, c2 = ((a, mid1), (b, mid2)) if horiz else ((mid1, a), (mid2, b))
    return [(*c1, r1), (*c2, rad(spec["second_size"]))]


def render(spec, s, rng):
    """Draw one image; returns (PIL RGB image, bool mask of the main object)."""
    domain = spec["domain"]
    bg = Image.fromarray(np.clip(_background(domain, s, rng), 0, 255).astype(np.uint8))
    _clutter(bg, domain, rng)
    img = np.asarray(bg).astype(float)
    objs = [(spec["class"], spec["colour"])]
    if spec["relation"]:
        objs.append((spec["second_class"], spec["second_colour"]))
    masks = []
    for (cls, colour), (cx, cy, r) in zip(objs, _place(spec, s, rng)):
        masks.append(_shape_mask(cls, cx, cy, r, s))
        _paint(img, masks[-1], colour, domain, rng, cx, cy, r)
    if domain == "painting":
        img += rng.normal(0, 8, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if domain == "painting":
        out = out.filter(ImageFilter.GaussianBlur(s / 64))
    return out, masks[0]


# ---------------------------------------------------------------- sampling
@dataclass
class Sample:
    meta: dict   # fields + caption + path (relative to root) + key
    png: bytes
    mask: np.ndarray


def _spec(rng, domain, cls, two):
    colours, others = list(COLOURS), [c for c in CLASSES if c != cls]
    spec = {"domain": domain, "class": cls, "colour": colours[rng.integers(6)],
            "size": SIZES[rng.integers(2)], "relation": None,
            "second_class": None, "second_colour": None, "second_size": None}
    if two:
        spec.update(relation=RELATIONS[rng.integers(4)],
                    second_class=others[rng.integers(len(others))],
                    second_colour=[c for c in colours if c != spec["colour"]][rng.integers(5)],
                    second_size=SIZES[rng.integers(2)])
    return spec


def _make(spec, s, rng, path, key, index):
    img, mask = render(spec, s, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    meta = dict(spec, index=index, key=key, path=path, caption=make_caption(spec))
    return Sample(meta, buf.getvalue(), mask)


def _render_grid(seed, stream, domains, folder, image_size, per_class_domain,
                 two_object_fraction, desc, progress):
    """per_class_domain images for every (domain, class), drawn from sub-stream `stream`."""
    jobs = [(d, c, i) for d in range(len(domains)) for c in range(len(CLASSES))
            for i in range(per_class_domain)]
    out = []
    for d, c, i in tqdm(jobs, desc=desc, disable=not progress):
        rng, dom, cls = _rng(seed, stream, d, c, i), domains[d], CLASSES[c]
        spec = _spec(rng, dom, cls, rng.random() < two_object_fraction)
        path = f"{folder}/{dom}/{class_folder(cls)}/{i:05d}.png"
        out.append(_make(spec, image_size, rng, path, f"{dom}_{class_folder(cls)}_{i:05d}", i))
    return out


def render_world(seed, image_size, per_class_domain, two_object_fraction, progress=False):
    """Main image set (DomainBed, Dassl): every domain."""
    return _render_grid(seed, 0, DOMAINS, f"domainbed/{DOMAINBED_DIRNAME}", image_size,
                        per_class_domain, two_object_fraction, "world", progress)


def render_pretraining_pool(seed, image_size, per_class_domain, two_object_fraction,
                            progress=False):
    """Images for the pairs only (seen domains): no DomainBed/Dassl image is in them."""
    return _render_grid(seed, 5, PAIR_DOMAINS, "pairs/images", image_size, per_class_domain,
                        two_object_fraction, "pretraining pairs", progress)


def render_compositional(seed, image_size, per_class=10):
    """Held-out set: every other image has two objects; domains cycle."""
    out = []
    for c, cls in enumerate(CLASSES):
        for i in range(per_class):
            rng, dom = _rng(seed, 1, c, i), DOMAINS[(i // 2) % len(DOMAINS)]
            key = f"{dom}_{class_folder(cls)}_{i:05d}"
            out.append(_make(_spec(rng, dom, cls, i % 2 == 1), image_size, rng,
                             f"compositional/images/{key}.png", key, i))
    return out


# ---------------------------------------------------------------- writers
def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path, obj):
    _write(path, json.dumps(obj, indent=1).encode())


def _save_images(root, samples):
    for smp in samples:
        path = root / smp.meta["path"]
        _write(path, smp.png)
        np.save(path.with_name(path.stem + "_mask.npy"), smp.mask)


def write_domainbed(root, samples):
    _save_images(root, samples)
    return {"domainbed_root": str(root / "domainbed"),
            "domainbed_dataset": str(root / "domainbed" / DOMAINBED_DIRNAME)}


def _split(seed, domain_idx, cls_idx, n):
    """Deterministic per-class 60/20/20 split of indices 0..n-1."""
    perm = _rng(seed, 4, domain_idx, cls_idx).permutation(n).tolist()
    k = round(0.2 * n) or (1 if n >= 3 else 0)
    return {"train": perm[:n - 2 * k], "val": perm[n - 2 * k:n - k], "test": perm[n - k:]}


def write_coop(root, samples, seed):
    """OxfordPets-shaped copy of the photo domain + a 4-domain Dassl split."""
    pets, cw = root / "coop" / "oxford_pets", root / "coop" / "clip_world"
    (pets / "annotations").mkdir(parents=True, exist_ok=True)
    by = {(s.meta["domain"], s.meta["class"], s.meta["index"]): s for s in samples}
    n = max(s.meta["index"] for s in samples) + 1
    pets_split = {"train": [], "val": [], "test": []}
    cw_split = {"train": [], "val": [], "test": []}
    for d, dom in enumerate(DOMAINS):
        for c, cls in enumerate(CLASSES):
            for part, idx in _split(seed, d, c, n).items():
                for i in sorted(idx):
                    smp, fname = by[dom, cls, i], f"{class_folder(cls)}_{i:05d}.png"
                    _write(cw / "images" / dom / fname, smp.png)
                    cw_split[part].append([f"{dom}/{fname}", c, cls, dom])
                    if dom == "photo":
                        _write(pets / "images" / f"{dom}_{fname}", smp.png)
                        pets_split[part].append([f"{dom}_{fname}", c, cls])
    _write_json(pets / "split_zhou_OxfordPets.json", pets_split)
    _write_json(cw / "split_clip_world.json", cw_split)
    return {"coop_root": str(root / "coop"), "coop_oxford_pets": str(pets),
            "coop_oxford_pets_split": str(pets / "split_zhou_OxfordPets.json"),
            "coop_clip_world": str(cw), "coop_clip_world_split": str(cw / "split_clip_world.json")}


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_pairs(root, pool, seed, shard_size=1000):
    """CSV (open_clip CsvDataset) and webdataset tar shards of the pretraining pool
    (seen domains only), one row per (image, caption of pretraining_captions)."""
    _save_images(root, pool)
    perm = _rng(seed, 3).permutation(len(pool))
    n_val = max(1, round(0.1 * len(pool)))
    val, train = [pool[i] for i in perm[:n_val]], [pool[i] for i in perm[n_val:]]
    out = {}
    for name, part in (("train", train), ("val", val)):
        rows = sorted(f"{root / s.meta['path']}\t{caption}\n" for s in part
                      for caption in pretraining_captions(s.meta))
        _write(root / "pairs" / f"{name}.csv", ("filepath\ttitle\n" + "".join(rows)).encode())
        out[f"pairs_{name}_csv"] = str(root / "pairs" / f"{name}.csv")
        out[f"num_{name}_samples"] = len(rows)
    pairs = sorted(((f"{s.meta['key']}_{k}", s.png, caption) for s in train
                    for k, caption in enumerate(pretraining_captions(s.meta))))
    shard_dir, n_shards = root / "pairs" / "shards", -(-len(pairs) // shard_size)
    shard_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_shards):
        with tarfile.open(shard_dir / f"train-{k:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, png, caption in pairs[k * shard_size:(k + 1) * shard_size]:
                _tar_add(tar, key + ".png", png)
                _tar_add(tar, key + ".txt", caption.encode())
    out.update(shards_pattern=str(shard_dir / f"train-{{000000..{n_shards - 1:06d}}}.tar"),
               num_shards=n_shards)
    return out


def _negative(meta, kind, rng):
    """Copy of meta's fields with exactly one field of the given kind changed."""
    f = dict(meta)
    pick = lambda opts: opts[rng.integers(len(opts))]
    if kind == "replace_att":
        f["colour"] = pick([c for c in COLOURS if c not in (meta["colour"], meta["second_colour"])])
    elif kind == "replace_obj":
        f["class"] = pick([c for c in CLASSES if c not in (meta["class"], meta["second_class"])])
    else:
        f["relation"] = pick([r for r in RELATIONS if r != meta["relation"]])
    return make_caption(f)


def write_compositional(root, samples, seed):
    """SugarCrepe-shaped JSONs; replace_rel only uses two-object images."""
    _save_images(root, samples)
    out = {}
    for k, kind in enumerate(("replace_att", "replace_obj", "replace_rel")):
        items = {}
        for j, s in enumerate(samples):
            if kind == "replace_rel" and not s.meta["relation"]:
                continue
            neg = _negative(s.meta, kind, _rng(seed, 2, k, j))
            items[str(len(items))] = {"filename": s.meta["path"], "caption": s.meta["caption"],
                                      "negative_caption": neg}
        _write_json(root / "compositional" / f"{kind}.json", items)
        out[f"compositional_{kind}"] = str(root / "compositional" / f"{kind}.json")
    out["compositional_root"] = str(root)  # filenames are relative to the world root
    return out


def write_metadata(root, samples):
    lines = [json.dumps(dict(s.meta, set=s.meta["path"].split("/")[0])) + "\n" for s in samples]
    _write(root / "metadata.jsonl", "".join(lines).encode())
    return {"metadata": str(root / "metadata.jsonl")}


# ---------------------------------------------------------------- driver
def generate_world(root, seed=0, image_size=64, per_class_domain=24,
                   two_object_fraction=0.3, compositional_per_class=10,
                   pretrain_per_class_domain=150, progress=False):
    """Write every form under root; no-op if WORLD_DONE.json matches the options."""
    root = Path(root).resolve()
    opts = {"version": _VERSION, "seed": seed, "image_size": image_size,
            "per_class_domain": per_class_domain, "two_object_fraction": two_object_fraction,
            "compositional_per_class": compositional_per_class,
            "pretrain_per_class_domain": pretrain_per_class_domain}
    marker = root / MARKER
    try:
        done = json.loads(marker.read_text())
        if done["options"] == opts:
            return done["paths"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    marker.unlink(missing_ok=True)  # stale/partial output: start fresh
    for name in OWNED:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    world = render_world(seed, image_size, per_class_domain, two_object_fraction, progress)
    comp = render_compositional(seed, image_size, compositional_per_class)
    pool = render_pretraining_pool(seed, image_size, pretrain_per_class_domain,
                                   two_object_fraction, progress)
    paths = {"root": str(root), "marker": str(marker)}
    paths.update(write_domainbed(root, world))
    paths.update(write_coop(root, world, seed))
    paths.update(write_pairs(root, pool, seed))
    paths.update(write_compositional(root, comp, seed))
    paths.update(write_metadata(root, world + comp + pool))
    # last, written whole (temporary + rename): marks completion
    write_json_atomic(marker, {"options": opts, "paths": paths})
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--per-class-domain", type=int, default=24)
    ap.add_argument("--two-object-fraction", type=float, default=0.3)
    ap.add_argument("--compositional-per-class", type=int, default=10)
    ap.add_argument("--pretrain-per-class-domain", type=int, default=150,
                    help="images per (seen domain, class) for the image-caption pairs")
    a = ap.parse_args(argv)
    paths = generate_world(a.root, a.seed, a.image_size, a.per_class_domain,
                           a.two_object_fraction, a.compositional_per_class,
                           a.pretrain_per_class_domain, progress=True)
    for k, v in paths.items():
        print(f"{k}\t{v}")


if __name__ == "__main__":
    cli.run(main)
