"""Evaluation datasets of `python -m pretraining.evaluate`, read from their own files.

A dataset is given on the command line as a SPEC `TYPE:PATH[,KEY=VALUE...]`:

zero-shot classification / linear probe (`ClassificationSet`: image files or a
torchvision dataset, integer labels, class names)
  cifar10:ROOT / cifar100:ROOT   torchvision's own files (ROOT/cifar-10-batches-py,
                                 ROOT/cifar-100-python), read as torchvision.datasets.CIFAR10/100
                                 does, but with an unpickler that loads arrays only (a batch
                                 file with pickled code is refused, never run), never
                                 downloaded; test split for zero-shot, train -> test for
                                 the linear probe. The MD5 sums are checked and reported
                                 (`md5_ok` in the record), not required, so small test copies load.
  folder:DIR[,classnames=FILE][,name=N][,test=DIR]
                                 ImageNet-style class folders (torchvision ImageFolder). FILE has
                                 lines "<folder> <class name>" (CoOp's imagenet classnames.txt);
                                 integer folders (ImageNet-V2: 0..999) map to line k when absent.
                                 Only the folders present are classes, so ImageNet-R / -A (200 of
                                 the 1000 wnids) get the 200-class head from the same FILE. Without
                                 FILE, the folder name with '_' -> ' '. Linear probe: DIR is the
                                 train split, test=DIR the test split.
  world:ROOT[,heldout=painting]  the generated dataset (clipworld, DomainBed layout
                                 <root>/domainbed/clip_world/<domain>/<class>/*.png): two sets,
                                 `world/seen` (the domains the pretraining pairs show: photo,
                                 sketch, cartoon) and `world/painting` (never in a pair). Linear
                                 probe: the world's Dassl split, train on seen-domain `train`,
                                 test on `test` of seen and of painting.
image-text retrieval / modality gap (`RetrievalSet`: images, captions, caption -> image)
  coco:CAPTIONS_JSON,images=DIR  COCO captions (captions_val2017.json: images[{id, file_name}],
                                 annotations[{image_id, caption}])
  karpathy:JSON,images=DIR[,split=test]
                                 Karpathy splits (dataset_flickr30k.json / dataset_coco.json:
                                 images[{filename, [filepath], split, sentences[{raw}]}])
  pairs:CSV[,sep=TAB][,img=filepath][,caption=title]
                                 open_clip_train's CSV of (image path, caption) rows (default
                                 separator: a tab when the header has one, else a comma); rows
                                 of the same image are its several captions
  world:ROOT                     the generated dataset's val pairs (pairs/val.csv)

The files are read by common/readers.py (one reader per format, shared with ComAlign);
here they become evaluation sets. Bad input raises `DataError` (common.readers) naming the
file or folder and what is wrong in one line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.readers import (ClassificationSet, DataError, Spec, cifar, image_folder, need_dir,
                            read_caption_csv, read_coco_captions, read_json, read_karpathy,
                            read_rgb)


class ImageFiles:
    """A map-style dataset of image files: transform(RGB image) per file."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(read_rgb(self.files[i]))


# --------------------------------------------------------------------------- classification
def world_paths(root) -> dict:
    """The generated world's paths (its WORLD_DONE.json)."""
    from clipworld import generate
    root = need_dir(root, "generated world root")
    marker = root / generate.MARKER
    if not marker.is_file():
        raise DataError(f"{marker}: no such file (not a finished world; generate one: "
                        f"python -m clipworld.generate --root {root})")
    done = read_json(marker, "world marker")
    if not isinstance(done, dict) or "paths" not in done:
        raise DataError(f"{marker}: no 'paths' (not a world marker)")
    return done["paths"]


def world_domains(heldout="painting"):
    from clipworld import generate
    held = [d.strip() for d in heldout.split("+")]
    unknown = [d for d in held if d not in generate.DOMAINS]
    if unknown:
        raise DataError(f"world: unknown held-out domain {unknown[0]!r} (domains: "
                        f"{', '.join(generate.DOMAINS)})")
    return [d for d in generate.DOMAINS if d not in held], held


def _world_set(name, dataset_dir, domains) -> ClassificationSet:
    from clipworld import generate
    folders = [generate.class_folder(c) for c in generate.CLASSES]
    files, labels = [], []
    for domain in domains:
        for k, folder in enumerate(folders):
            found = sorted((Path(dataset_dir) / domain / folder).glob("*.png"))
            files += map(str, found)
            labels += [k] * len(found)
    if not files:
        raise DataError(f"{dataset_dir}: no images of domain(s) {', '.join(domains)}")
    return ClassificationSet(name, list(generate.CLASSES), labels, files=files,
                             source=str(dataset_dir), info={"domains": list(domains)})


def world_zeroshot(root, heldout="painting") -> list[ClassificationSet]:
    """world/seen and world/<held-out> from the world's DomainBed images (none of which
    is in a pretraining pair)."""
    paths = world_paths(root)
    dataset_dir = need_dir(paths["domainbed_dataset"], "world DomainBed images")
    seen, held = world_domains(heldout)
    return [_world_set("world/seen", dataset_dir, seen),
            _world_set(f"world/{'+'.join(held)}", dataset_dir, held)]


def world_linear_probe(root, heldout="painting"):
    """(train, [tests]) from the world's Dassl split: train on the seen domains' train
    images; test on the seen and on the held-out domains' test images."""
    from clipworld import generate
    paths = world_paths(root)
    split = read_json(paths["coop_clip_world_split"], "world Dassl split")
    images = Path(paths["coop_clip_world"]) / "images"
    seen, held = world_domains(heldout)

    def part(name, key, domains):
        rows = [r for r in split[key] if r[3] in domains]
        if not rows:
            raise DataError(f"{paths['coop_clip_world_split']}: no {key} images of "
                            f"{', '.join(domains)} (world too small for a linear probe)")
        return ClassificationSet(name, list(generate.CLASSES), [int(r[1]) for r in rows],
                                 files=[str(images / r[0]) for r in rows], source=str(images),
                                 info={"domains": domains, "split": key})
    return part("world/seen-train", "train", seen), [part("world/seen", "test", seen),
                                                     part(f"world/{'+'.join(held)}", "test", held)]


def zeroshot_sets(spec: Spec) -> list[ClassificationSet]:
    o = spec.options
    if spec.type in ("cifar10", "cifar100"):
        return [cifar(spec.type, spec.path, train=False, name=o.get("name"))]
    if spec.type == "folder":
        return [image_folder(spec.path, o.get("classnames"), o.get("name"))]
    return world_zeroshot(spec.path, o.get("heldout", "painting"))


def linear_probe_sets(spec: Spec):
    """(train set, [test sets])."""
    o = spec.options
    if spec.type in ("cifar10", "cifar100"):
        name = o.get("name", spec.type)
        return (cifar(spec.type, spec.path, train=True, name=name),
                [cifar(spec.type, spec.path, train=False, name=name)])
    if spec.type == "folder":
        if "test" not in o:
            raise DataError(f"dataset spec {spec.text!r}: a linear probe needs test=DIR "
                            f"(DIR of the spec is the train split)")
        train = image_folder(spec.path, o.get("classnames"), o.get("name"))
        test = image_folder(o["test"], o.get("classnames"), train.name)
        if test.classnames != train.classnames:
            raise DataError(f"{o['test']}: its class folders differ from {spec.path}'s")
        return train, [test]
    return world_linear_probe(spec.path, o.get("heldout", "painting"))


ZEROSHOT_TYPES = ("cifar10", "cifar100", "folder", "world")
LINEAR_PROBE_TYPES = ZEROSHOT_TYPES
RETRIEVAL_TYPES = ("coco", "karpathy", "pairs", "world")


# --------------------------------------------------------------------------- retrieval
@dataclass
class RetrievalSet:
    """Images and captions; text_to_image[j] is the index of caption j's image."""
    name: str
    images: list[str]
    captions: list[str]
    text_to_image: list[int]
    source: str = ""
    info: dict = field(default_factory=dict)

    def image_to_texts(self) -> list[list[int]]:
        out = [[] for _ in self.images]
        for j, i in enumerate(self.text_to_image):
            out[i].append(j)
        return out

    def first_caption_pairs(self):
        """(image index, caption index) of each image's first caption."""
        return [(i, texts[0]) for i, texts in enumerate(self.image_to_texts()) if texts]


def _grouped(name, rows, source, info=None, missing_ok=False) -> RetrievalSet:
    """rows: (image path, caption) in file order -> RetrievalSet (images in first-seen order)."""
    index, images, captions, t2i = {}, [], [], []
    for path, caption in rows:
        if path not in index:
            index[path] = len(images)
            images.append(path)
        captions.append(caption)
        t2i.append(index[path])
    if not images:
        raise DataError(f"{source}: no image-caption pairs")
    absent = [p for p in images if not os.path.isfile(p)]
    if absent and not missing_ok:
        raise DataError(f"{absent[0]}: no such image file ({len(absent)} of {len(images)} "
                        f"images of {source} are missing)")
    return RetrievalSet(name, images, captions, t2i, str(source), info or {})


def coco_captions(captions_json, images_dir, name="coco") -> RetrievalSet:
    """COCO captions JSON, images by image id, every caption."""
    images_dir = need_dir(images_dir, "COCO images")
    rows = read_coco_captions(captions_json, images_dir, by_image_id=True)
    return _grouped(name, rows, captions_json)


def karpathy(json_path, images_dir, split="test", name=None) -> RetrievalSet:
    """Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json), every sentence."""
    images_dir = need_dir(images_dir, "Karpathy images")
    rows = read_karpathy(json_path, images_dir, split)
    default = Path(json_path).stem.removeprefix("dataset_")
    return _grouped(name or f"{default}-{split}", rows, json_path, {"split": split})


def pairs_csv(csv_path, sep=None, img_key="filepath", caption_key="title",
              name=None) -> RetrievalSet:
    """open_clip_train's CSV (rows of image path and caption; paths as open_clip_train
    reads them: relative ones from the working folder)."""
    rows = read_caption_csv(csv_path, sep, img_key, caption_key)
    return _grouped(name or Path(csv_path).stem, rows, csv_path)


def retrieval_set(spec: Spec) -> RetrievalSet:
    o = spec.options
    if spec.type == "coco":
        return coco_captions(spec.path, spec.need("images"), o.get("name", "coco"))
    if spec.type == "karpathy":
        return karpathy(spec.path, spec.need("images"), o.get("split", "test"), o.get("name"))
    if spec.type == "pairs":
        return pairs_csv(spec.path, o.get("sep"), o.get("img", "filepath"),
                         o.get("caption", "title"), o.get("name"))
    paths = world_paths(spec.path)
    return pairs_csv(paths["pairs_val_csv"], name=o.get("name", "world/val-pairs"))
