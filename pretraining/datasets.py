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
  flickr:JSON,images=DIR         Eslami & de Melo's flickr30k_test.json ([{image, caption:
                                 [captions]}], image relative to DIR)
  every retrieval type takes prompt=TEMPLATE (each caption put into it: 'a photo of {}')
  and per_image=K (each image's first K captions), as their scripts read captions.

Eslami & de Melo's zero-shot datasets (sarahESL/AlignCLIP `main/data.py`; types named after
their flags), in the layouts their code reads, class names theirs
(metadata/eslami_evaluation.json; open_clip's IMAGENET_CLASSNAMES where equal):
  imagenet-val:DIR[,train=DIR[,seed=N]]
                                 ImageNet val in its 1000 wnid class folders (ImageFolder);
                                 train=DIR for the linear probe (their 50 images per class)
  imagenet-sketch:DIR            ImageNet-Sketch's `sketch` folder (1000 wnid folders)
  imagenet-a:DIR / imagenet-r:DIR / imagenet-o:DIR
                                 the 200 wnid folders of each; label = rank of the folder
                                 among the sorted folders, name = their 200-name list
  imagenet-v2:DIR                imagenetv2_pytorch's location: DIR/ImageNetV2-matched-
                                 frequency/<0..999>/*.jpeg (or DIR itself with those
                                 folders); label = the folder's integer
  flowers-102:ROOT               torchvision's Flowers102 files: ROOT/flowers-102/{jpg/,
                                 imagelabels.mat, setid.mat}; test split `tstid`
  food-101:ROOT[,classnames=dataset]
                                 torchvision's Food101 files: ROOT/food-101/{images/,
                                 meta/test.json}; label = rank of the class among the sorted
                                 keys (their list swaps cheesecake and cheese_plate against
                                 it: kept, as their numbers were made; `dataset`: the keys)
  stanford-cars:ROOT[,classnames=dataset]
                                 torchvision's StanfordCars files: ROOT/stanford_cars/{cars_test/,
                                 cars_test_annos_withlabels.mat, devkit/cars_meta.mat}
                                 (scipy.io); `dataset`: devkit/cars_meta.mat's class names
  cifar10 / cifar100 take classnames=eslami for their lists (CIFAR-100's differ from
  torchvision's: "apples", not "apple").
Their linear probe: cifar*, imagenet-val (with train=), flowers-102, food-101 and
stanford-cars, train split -> test split.

The files are read by common/readers.py (one reader per format, shared with ComAlign);
here they become evaluation sets. Bad input raises `DataError` (common.readers) naming the
file or folder and what is wrong in one line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.readers import (ClassificationSet, DataError, Spec, _md5, cifar, image_folder,
                            need_dir, need_file, read_caption_csv, read_coco_captions,
                            read_json, read_karpathy, read_rgb)


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


def _cifar(spec: Spec, train: bool, name=None) -> ClassificationSet:
    s = cifar(spec.type, spec.path, train=train, name=name)
    choice = spec.options.get("classnames", "dataset")
    if choice not in ("dataset", "eslami"):
        raise DataError(f"dataset spec {spec.text!r}: classnames= takes dataset or eslami")
    if choice == "eslami":
        s.classnames = _named(eslami_classnames(spec.type), len(s.classnames), s.source)
        s.info["classnames"] = "eslami"
    return s


def zeroshot_sets(spec: Spec) -> list[ClassificationSet]:
    o = spec.options
    if spec.type in ("cifar10", "cifar100"):
        return [_cifar(spec, train=False, name=o.get("name"))]
    if spec.type == "folder":
        return [image_folder(spec.path, o.get("classnames"), o.get("name"))]
    if spec.type in ESLAMI_TYPES:
        return [eslami_set(spec, "test")]
    return world_zeroshot(spec.path, o.get("heldout", "painting"))


def linear_probe_sets(spec: Spec):
    """(train set, [test sets])."""
    o = spec.options
    if spec.type in ("cifar10", "cifar100"):
        name = o.get("name", spec.type)
        return _cifar(spec, train=True, name=name), [_cifar(spec, train=False, name=name)]
    if spec.type in ESLAMI_PROBE_TYPES:
        return eslami_set(spec, "train"), [eslami_set(spec, "test")]
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


ESLAMI_TYPES = ("imagenet-val", "imagenet-sketch", "imagenet-a", "imagenet-r", "imagenet-o",
                "imagenet-v2", "flowers-102", "food-101", "stanford-cars")
ESLAMI_PROBE_TYPES = ("imagenet-val", "flowers-102", "food-101", "stanford-cars")
ZEROSHOT_TYPES = ("cifar10", "cifar100", "folder", "world", *ESLAMI_TYPES)
LINEAR_PROBE_TYPES = ("cifar10", "cifar100", "folder", "world", *ESLAMI_PROBE_TYPES)
RETRIEVAL_TYPES = ("coco", "karpathy", "pairs", "world", "flickr")


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
    """The set of a retrieval SPEC, its captions put into prompt= and cut to per_image=."""
    o = spec.options
    if spec.type == "coco":
        s = coco_captions(spec.path, spec.need("images"), o.get("name", "coco"))
    elif spec.type == "karpathy":
        s = karpathy(spec.path, spec.need("images"), o.get("split", "test"), o.get("name"))
    elif spec.type == "pairs":
        s = pairs_csv(spec.path, o.get("sep"), o.get("img", "filepath"),
                      o.get("caption", "title"), o.get("name"))
    elif spec.type == "flickr":
        s = flickr_json(spec.path, spec.need("images"), o.get("name", "flickr"))
    else:
        paths = world_paths(spec.path)
        s = pairs_csv(paths["pairs_val_csv"], name=o.get("name", "world/val-pairs"))
    per_image = o.get("per_image")
    if per_image is not None and not (per_image.isdigit() and int(per_image) > 0):
        raise DataError(f"dataset spec {spec.text!r}: per_image= takes a positive integer")
    prompt = o.get("prompt")
    if prompt is not None and prompt.count("{}") != 1:
        raise DataError(f"dataset spec {spec.text!r}: prompt= needs one '{{}}' (the caption)")
    return prompted(s, prompt, int(per_image) if per_image else None)


def prompted(s: RetrievalSet, prompt=None, per_image=None) -> RetrievalSet:
    """Each image's first `per_image` captions (all: None), put into `prompt` ('{}' = the
    caption; None: as they are), grouped by image in image order."""
    if prompt is None and per_image is None:
        return s
    captions, t2i = [], []
    for i, texts in enumerate(s.image_to_texts()):
        for j in texts[:per_image]:
            captions.append(prompt.replace("{}", s.captions[j]) if prompt else s.captions[j])
            t2i.append(i)
    info = {**s.info, **({"prompt": prompt} if prompt else {}),
            **({"per_image": per_image} if per_image else {})}
    return RetrievalSet(s.name, s.images, captions, t2i, s.source, info)


def flickr_json(path, images_dir, name="flickr") -> RetrievalSet:
    """Eslami & de Melo's flickr30k_test.json: [{"image": path under images_dir,
    "caption": [captions]}], images in file order (their `Flickr` dataset)."""
    images_dir = need_dir(images_dir, "Flickr images")
    data = read_json(path, "Flickr caption JSON")
    if not isinstance(data, list):
        raise DataError(f"{path}: not a Flickr caption file (a JSON list of "
                        f"{{'image', 'caption': [...]}})")
    rows = []
    for k, item in enumerate(data):
        if not (isinstance(item, dict) and isinstance(item.get("image"), str)
                and isinstance(item.get("caption"), list)
                and all(isinstance(c, str) for c in item["caption"]) and item["caption"]):
            raise DataError(f"{path}: item {k} is not {{'image': str, 'caption': [strings]}}")
        rows += [(str(images_dir / item["image"]), c.strip()) for c in item["caption"]]
    return _grouped(name, rows, path)


# --------------------------------------------------------------------------- Eslami & de Melo
ESLAMI_METADATA = Path(__file__).resolve().parent / "metadata" / "eslami_evaluation.json"
# their class-name list of each type (imagenet: open_clip's, equal to theirs: a test)
ESLAMI_CLASSES = {"imagenet-val": "imagenet", "imagenet-sketch": "imagenet",
                  "imagenet-v2": "imagenet", "imagenet-a": "imagenet-a",
                  "imagenet-r": "imagenet-r", "imagenet-o": "imagenet-o",
                  "flowers-102": "flowers-102", "food-101": "food-101",
                  "stanford-cars": "stanford-cars", "cifar10": "cifar10", "cifar100": "cifar100"}
PROBE_PER_CLASS = 50  # their ImageNet linear-probe train subset (main/data.py get_imagenet)
V2_SIZE = 10000  # imagenetv2_pytorch downloads the set again when it finds another count


def eslami_metadata() -> dict:
    """metadata/eslami_evaluation.json: their class names, templates, captions, scripts."""
    from common.files import read_json as read
    return read(ESLAMI_METADATA)


def eslami_classnames(key: str) -> list[str]:
    """Their class names of a dataset (a type or a key of the metadata's classnames)."""
    key = ESLAMI_CLASSES.get(key, key)
    if key == "imagenet":
        import open_clip
        return list(open_clip.IMAGENET_CLASSNAMES)
    return list(eslami_metadata()["classnames"][key])


def _named(names, n_classes, source):
    if len(names) != n_classes:
        raise DataError(f"{source}: {n_classes} classes, but the class-name list has "
                        f"{len(names)} (labels would not match the names)")
    return list(names)


def eslami_set(spec: Spec, split: str) -> ClassificationSet:
    """A zero-shot (split test) or linear-probe train set of one of ESLAMI_TYPES."""
    o, kind = spec.options, spec.type
    name = o.get("name", kind)
    choice = o.get("classnames", "eslami")
    if choice not in (("eslami", "dataset") if kind in ("food-101", "stanford-cars")
                      else ("eslami",)):
        raise DataError(f"dataset spec {spec.text!r}: classnames= takes "
                        f"{'eslami or dataset' if kind in ('food-101', 'stanford-cars') else 'eslami'}")
    if kind == "flowers-102":
        return flowers102(spec.path, split, name)
    if kind == "food-101":
        return food101(spec.path, split, name, theirs=choice == "eslami")
    if kind == "stanford-cars":
        return stanford_cars(spec.path, split, name, theirs=choice == "eslami")
    if kind == "imagenet-v2":
        return imagenet_v2(spec.path, name)
    if kind == "imagenet-val" and split == "train":
        train = class_folders(spec.need("train"), eslami_classnames(kind), name,
                              "ImageNet train")
        return per_class_subset(train, PROBE_PER_CLASS, int(o.get("seed", 0)))
    return class_folders(spec.path, eslami_classnames(kind), name, kind)


def class_folders(directory, classnames, name, what) -> ClassificationSet:
    """torchvision ImageFolder's listing (label = rank of the class folder among the
    sorted folders, images of its extensions, walked in sorted order), with every class
    folder counted (empty ones too) and their count checked against the names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    directory = need_dir(directory, f"{what} folder")
    try:
        folders, index = find_classes(str(directory))
    except FileNotFoundError:
        folders, index = [], {}
    if not folders:
        raise DataError(f"{directory}: no class folders ({what} is read as "
                        f"torchvision ImageFolder: one folder per class)")
    _named(classnames, len(folders), f"{directory} ({what})")
    samples = make_dataset(str(directory), index, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"{directory}: no images in its {len(folders)} class folders")
    files, labels = zip(*samples)
    return ClassificationSet(name, list(classnames), list(labels), files=list(files),
                             source=str(directory),
                             info={"first_folder": folders[0], "last_folder": folders[-1]})


def per_class_subset(s: ClassificationSet, k: int, seed: int) -> ClassificationSet:
    """k images of each class drawn at random (all of a class with fewer)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    labels = np.asarray(s.labels)
    keep = sorted(int(i) for c in np.unique(labels)
                  for i in rng.permutation(np.flatnonzero(labels == c))[:k])
    return ClassificationSet(s.name, s.classnames, [s.labels[i] for i in keep],
                             files=[s.files[i] for i in keep], source=s.source,
                             info={**s.info, "per_class": k, "subset_seed": seed})


def imagenet_v2(location, name="imagenet-v2") -> ClassificationSet:
    """imagenetv2_pytorch's ImageNetV2Dataset files: LOCATION/ImageNetV2-matched-frequency/
    <class index>/*.jpeg (their --imagenet-v2 is LOCATION), or the class-index folders
    directly (the archive's imagenetv2-matched-frequency-format-val)."""
    location = need_dir(location, "ImageNet-V2 location")
    root = location / "ImageNetV2-matched-frequency"
    root = root if root.is_dir() else location
    files = sorted(root.glob("**/*.jpeg"))
    if not files:
        raise DataError(f"{root}: no <class index>/*.jpeg files (ImageNet-V2 matched-"
                        f"frequency layout, as imagenetv2_pytorch reads it)")
    names = eslami_classnames("imagenet")
    labels = []
    for f in files:
        folder = f.parent.name
        if not (folder.isdigit() and int(folder) < len(names)):
            raise DataError(f"{f}: its folder {folder!r} is not a class index 0..{len(names) - 1}")
        labels.append(int(folder))
    return ClassificationSet(name, names, labels, files=list(map(str, files)), source=str(root),
                             info={"complete": len(files) == V2_SIZE})


def _loadmat(path, what):
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError
    path = need_file(path, what)
    try:
        return loadmat(str(path), squeeze_me=True)
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as e:
        raise DataError(f"{path}: not a MATLAB file ({what}): {str(e).splitlines()[0]}") from None


def _mat_field(mat, key, path, what):
    if key not in mat:
        raise DataError(f"{path}: no {key!r} ({what}; keys: "
                        f"{', '.join(k for k in mat if not k.startswith('__'))})")
    return mat[key]


FLOWERS_MD5 = {"imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
               "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c"}  # torchvision's Flowers102
FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}


def flowers102(root, split="test", name="flowers-102") -> ClassificationSet:
    """torchvision's Flowers102 files: ROOT/flowers-102/{jpg/image_%05d.jpg,
    imagelabels.mat (1-based labels of every image), setid.mat (image ids of each split)}.
    MD5 sums reported (`md5_ok`), not required."""
    import numpy as np
    base = need_dir(Path(need_dir(root, "Flowers-102 root")) / "flowers-102", "Flowers-102 folder")
    images = need_dir(base / "jpg", "Flowers-102 images")
    ids = _mat_field(_loadmat(base / "setid.mat", "Flowers-102 splits"), FLOWERS_SPLITS[split],
                     base / "setid.mat", "Flowers-102 splits")
    all_labels = _mat_field(_loadmat(base / "imagelabels.mat", "Flowers-102 labels"), "labels",
                            base / "imagelabels.mat", "Flowers-102 labels")
    ids, all_labels = np.atleast_1d(ids).tolist(), np.atleast_1d(all_labels).tolist()
    labels, files = [], []
    for image_id in ids:
        if not 1 <= image_id <= len(all_labels):
            raise DataError(f"{base / 'setid.mat'}: image id {image_id} has no label in "
                            f"imagelabels.mat ({len(all_labels)} labels)")
        labels.append(int(all_labels[image_id - 1]) - 1)
        files.append(str(images / f"image_{image_id:05d}.jpg"))
    names = eslami_classnames("flowers-102")
    bad = [l for l in labels if not 0 <= l < len(names)]
    if bad:
        raise DataError(f"{base / 'imagelabels.mat'}: label {bad[0] + 1} is not 1..{len(names)}")
    _existing(files, base)
    md5_ok = all(_md5(base / f) == m for f, m in FLOWERS_MD5.items())
    return ClassificationSet(name, names, labels, files=files, source=str(base),
                             info={"split": split, "md5_ok": md5_ok})


def _existing(files, source):
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise DataError(f"{absent[0]}: no such image file ({len(absent)} of {len(files)} "
                        f"images of {source} are missing)")
    if not files:
        raise DataError(f"{source}: no images in the split")


def food101(root, split="test", name="food-101", theirs=True) -> ClassificationSet:
    """torchvision's Food101 files: ROOT/food-101/{meta/<split>.json ({class: ["class/id",
    ...]}), images/<class>/<id>.jpg}; label = rank of the class among the sorted keys."""
    base = need_dir(Path(need_dir(root, "Food-101 root")) / "food-101", "Food-101 folder")
    meta = read_json(base / "meta" / f"{split}.json", "Food-101 split")
    if not (isinstance(meta, dict) and all(isinstance(v, list) for v in meta.values())):
        raise DataError(f"{base / 'meta' / f'{split}.json'}: not a Food-101 split "
                        f"({{class: [\"class/id\", ...]}})")
    classes = sorted(meta)
    index = {c: k for k, c in enumerate(classes)}
    labels, files = [], []
    for c, rel in meta.items():
        labels += [index[c]] * len(rel)
        files += [str(base / "images" / f"{r}.jpg") for r in rel]
    names = _named(eslami_classnames("food-101") if theirs else classes, len(classes),
                   base / "meta" / f"{split}.json")
    _existing(files, base)
    return ClassificationSet(name, names, labels, files=files, source=str(base),
                             info={"split": split, "classnames": "eslami" if theirs else "dataset"})


def stanford_cars(root, split="test", name="stanford-cars", theirs=True) -> ClassificationSet:
    """torchvision's StanfordCars files: ROOT/stanford_cars/{cars_test/,
    cars_test_annos_withlabels.mat, cars_train/, devkit/{cars_train_annos.mat,
    cars_meta.mat}}; annotations (fname, 1-based class) read with scipy.io."""
    import numpy as np
    base = need_dir(Path(need_dir(root, "Stanford Cars root")) / "stanford_cars",
                    "Stanford Cars folder")
    annos = (base / "devkit" / "cars_train_annos.mat" if split == "train"
             else base / "cars_test_annos_withlabels.mat")
    images = need_dir(base / ("cars_train" if split == "train" else "cars_test"),
                      "Stanford Cars images")
    rows = np.atleast_1d(_mat_field(_loadmat(annos, "Stanford Cars annotations"),
                                    "annotations", annos, "Stanford Cars annotations"))
    try:
        pairs = [(str(images / str(r["fname"])), int(r["class"]) - 1) for r in rows]
    except (ValueError, IndexError, KeyError, TypeError):
        raise DataError(f"{annos}: annotations need fields 'fname' and 'class'") from None
    meta_path = base / "devkit" / "cars_meta.mat"
    dataset_names = [str(c) for c in np.atleast_1d(_mat_field(
        _loadmat(meta_path, "Stanford Cars class names"), "class_names", meta_path,
        "Stanford Cars class names"))]
    names = _named(eslami_classnames("stanford-cars") if theirs else dataset_names,
                   len(dataset_names), meta_path)
    bad = [c for _, c in pairs if not 0 <= c < len(names)]
    if bad:
        raise DataError(f"{annos}: class {bad[0] + 1} is not 1..{len(names)}")
    files = [f for f, _ in pairs]
    _existing(files, base)
    return ClassificationSet(name, names, [c for _, c in pairs], files=files, source=str(base),
                             info={"split": split, "classnames": "eslami" if theirs else "dataset"})
