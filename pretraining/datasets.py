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
                                 open_clip_train's CSV of (image path, caption) rows; rows of the
                                 same image are its several captions
  world:ROOT                     the generated dataset's val pairs (pairs/val.csv)

Bad input raises `DataError` naming the file or folder and what is wrong in one line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFiles:
    """A map-style dataset of image files: transform(RGB image) per file."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(read_rgb(self.files[i]))


class DataError(ValueError):
    """Bad evaluation input: one line naming what and where."""


def read_rgb(path):
    """An image file as an RGB PIL image; an unreadable file is a DataError naming it."""
    from PIL import Image

    from common import cli
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({cli.image_problem(path, e)})") from None


@dataclass
class Spec:
    type: str
    path: str
    options: dict = field(default_factory=dict)
    text: str = ""


def parse_spec(text: str, allowed) -> Spec:
    """'TYPE:PATH[,KEY=VALUE...]' -> Spec (commas inside PATH are not supported)."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise DataError(f"dataset spec {text!r}: expected TYPE:PATH[,KEY=VALUE...] "
                        f"with TYPE one of {', '.join(allowed)}")
    if kind not in allowed:
        raise DataError(f"dataset spec {text!r}: unknown type {kind!r} "
                        f"(here: {', '.join(allowed)})")
    path, *opts = rest.split(",")
    options = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq:
            raise DataError(f"dataset spec {text!r}: option {opt!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return Spec(kind, os.path.expanduser(path), options, text)


def _need_dir(path, what) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder ({what})")
    return path


def _need_file(path, what) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what})")
    return path


def _read_json(path, what):
    path = _need_file(path, what)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not JSON ({what}): {e}") from None


# --------------------------------------------------------------------------- classification
@dataclass
class ClassificationSet:
    """Images + integer labels + class names. Either `files` (paths) or `dataset` (a
    torchvision dataset yielding (PIL image, label)); `transform` is set by the caller."""
    name: str
    classnames: list[str]
    labels: list[int]
    files: list[str] | None = None
    dataset: object = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.labels)

    def torch_dataset(self, transform):
        if self.dataset is not None:
            self.dataset.transform = transform
            return self.dataset
        return _Files(self.files, self.labels, transform)


class _Files:
    """(transform(image), label) of image files; a torch map-style dataset."""

    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(read_rgb(self.files[i])), self.labels[i]


def _md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cifar(kind: str, root, train: bool, name=None) -> ClassificationSet:
    """CIFAR-10/100 from torchvision's files under root (download=False)."""
    from torchvision import datasets as tvd
    base = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    root = _need_dir(root, f"{kind} root")
    folder = root / base.base_folder
    split_files = base.train_list if train else base.test_list
    needed = [folder / f for f, _ in split_files] + [folder / base.meta["filename"]]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such file ({kind} {'train' if train else 'test'} "
                        f"split, torchvision layout; get it with torchvision.datasets."
                        f"{base.__name__}(root, download=True))")
    md5_ok = all(_md5(folder / f) == m for f, m in split_files + [(base.meta["filename"],
                                                                   base.meta["md5"])])

    class Reader(base):
        # torchvision's reading, with an unpickler that loads arrays and nothing else
        # (torchvision's pickle.load would run whatever code a batch file carries); the
        # files are checked above (presence); MD5 is reported, not required
        def __init__(self, root, train):
            import numpy as np
            from torchvision.datasets import VisionDataset
            VisionDataset.__init__(self, root)
            self.train, self.data, self.targets = train, [], []
            for file_name, _ in self.train_list if train else self.test_list:
                entry = load_cifar_pickle(folder / file_name)
                self.data.append(entry["data"])
                self.targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
            self.data = np.vstack(self.data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self._load_meta()

        def _load_meta(self):
            data = load_cifar_pickle(folder / self.meta["filename"])
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        ds = Reader(str(root), train=train)
    except (KeyError, ValueError, EOFError, OSError, TypeError, pickle.UnpicklingError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{folder}: not CIFAR's pickle format ({type(e).__name__}: {e})") from None
    return ClassificationSet(name or kind, [c.replace("_", " ") for c in ds.classes],
                             [int(t) for t in ds.targets], dataset=ds, source=str(folder),
                             info={"split": "train" if train else "test", "md5_ok": md5_ok})


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts, lists, strings, bytes, numbers, numpy
    arrays); any other global, i.e. code a crafted file would run, is refused."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
               for n in ("_reconstruct", "scalar")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"GLOBAL {module}.{name}")


def load_cifar_pickle(path):
    with open(path, "rb") as f:
        try:
            return _ArraysOnly(f, encoding="latin1").load()
        except _RefusedGlobal as e:
            raise DataError(f"{path}: refused: the file holds pickled code or objects that are "
                            f"not arrays ({e}); CIFAR batches are read with an unpickler that "
                            f"never runs it") from None


def read_classnames(path) -> dict[str, str]:
    """'<folder> <class name>' lines -> {folder: name}, in file order."""
    path = _need_file(path, "classnames file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (classnames file): {e}") from None
    out = {}
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        folder, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DataError(f"{path}:{no}: expected '<folder> <class name>', got {line!r}")
        out[folder] = name.strip()
    return out


def image_folder(directory, classnames_file=None, name=None) -> ClassificationSet:
    """Class folders (torchvision ImageFolder, classes = the folders present)."""
    from torchvision.datasets import ImageFolder
    directory = _need_dir(directory, "image folder dataset")
    try:
        ds = ImageFolder(str(directory))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{directory}: not a folder of class folders with images ({e})") from None
    mapping = read_classnames(classnames_file) if classnames_file else None
    order = list(mapping.values()) if mapping else []
    classnames = []
    for folder in ds.classes:
        if mapping is None:
            classnames.append(folder.replace("_", " "))
        elif folder in mapping:
            classnames.append(mapping[folder])
        elif folder.isdigit() and int(folder) < len(order):
            classnames.append(order[int(folder)])
        else:
            raise DataError(f"{classnames_file}: no class name for folder {folder!r} of {directory}")
    files, labels = zip(*ds.samples) if ds.samples else ((), ())
    info = {"classes_of_mapping": len(mapping)} if mapping else {}
    return ClassificationSet(name or directory.name, classnames, list(labels), files=list(files),
                             source=str(directory), info=info)


def world_paths(root) -> dict:
    """The generated world's paths (its WORLD_DONE.json)."""
    from clipworld import generate
    root = _need_dir(root, "generated world root")
    marker = root / generate.MARKER
    if not marker.is_file():
        raise DataError(f"{marker}: no such file (not a finished world; generate one: "
                        f"python -m clipworld.generate --root {root})")
    done = _read_json(marker, "world marker")
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
    dataset_dir = _need_dir(paths["domainbed_dataset"], "world DomainBed images")
    seen, held = world_domains(heldout)
    return [_world_set("world/seen", dataset_dir, seen),
            _world_set(f"world/{'+'.join(held)}", dataset_dir, held)]


def world_linear_probe(root, heldout="painting"):
    """(train, [tests]) from the world's Dassl split: train on the seen domains' train
    images; test on the seen and on the held-out domains' test images."""
    from clipworld import generate
    paths = world_paths(root)
    split = _read_json(paths["coop_clip_world_split"], "world Dassl split")
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
    """COCO captions JSON (images[{id, file_name}], annotations[{image_id, caption}])."""
    data = _read_json(captions_json, "COCO captions JSON")
    images_dir = _need_dir(images_dir, "COCO images")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{captions_json}: not COCO captions (needs lists 'images' and "
                        f"'annotations')")
    try:
        files = {im["id"]: str(images_dir / im["file_name"]) for im in data["images"]}
        by_image = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{captions_json}: not COCO captions (an image needs 'id' and "
                        f"'file_name', an annotation 'image_id' and 'caption'; missing {e})") from None
    unknown = [i for i in by_image if i not in files]
    if unknown:
        raise DataError(f"{captions_json}: annotation for image_id {unknown[0]} not in 'images'")
    rows = [(files[i], c) for i in sorted(by_image) for c in by_image[i]]
    return _grouped(name, rows, captions_json)


def karpathy(json_path, images_dir, split="test", name=None) -> RetrievalSet:
    """Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json)."""
    data = _read_json(json_path, "Karpathy split JSON")
    images_dir = _need_dir(images_dir, "Karpathy images")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: not a Karpathy split file (needs a list 'images')")
    rows = []
    try:
        for im in data["images"]:
            if im["split"] != split:
                continue
            path = images_dir / im.get("filepath", "") / im["filename"]
            rows += [(str(path), s["raw"].strip()) for s in im["sentences"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{json_path}: not a Karpathy split file (an image needs 'filename', "
                        f"'split', 'sentences[{{raw}}]'; missing {e})") from None
    if not rows:
        splits = sorted({str(im.get('split')) for im in data['images'] if isinstance(im, dict)})
        raise DataError(f"{json_path}: no images of split {split!r} (splits: {', '.join(splits)})")
    default = Path(json_path).stem.removeprefix("dataset_")
    return _grouped(name or f"{default}-{split}", rows, json_path, {"split": split})


def pairs_csv(csv_path, sep="\t", img_key="filepath", caption_key="title",
              name=None) -> RetrievalSet:
    """open_clip_train's CSV (rows of image path and caption)."""
    csv_path = _need_file(csv_path, "image-caption CSV")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        try:
            cols = reader.fieldnames or []
            for key in (img_key, caption_key):
                if key not in cols:
                    raise DataError(f"{csv_path}: no column {key!r} "
                                    f"(columns: {', '.join(map(repr, cols))})")
            rows = []
            for r in reader:
                if r[img_key] is None or r[caption_key] is None:
                    raise DataError(f"{csv_path}:{reader.line_num}: a row without "
                                    f"{img_key!r} or {caption_key!r}")
                rows.append((r[img_key], r[caption_key]))
        except UnicodeDecodeError as e:
            raise DataError(f"{csv_path}: not UTF-8 text (image-caption CSV): {e}") from None
        except csv.Error as e:
            raise DataError(f"{csv_path}:{reader.line_num}: not a CSV file ({e})") from None
    return _grouped(name or csv_path.stem, rows, csv_path)


def retrieval_set(spec: Spec) -> RetrievalSet:
    o = spec.options
    if spec.type in ("coco", "karpathy") and "images" not in o:
        raise DataError(f"dataset spec {spec.text!r}: needs images=DIR")
    if spec.type == "coco":
        return coco_captions(spec.path, o["images"], o.get("name", "coco"))
    if spec.type == "karpathy":
        return karpathy(spec.path, o["images"], o.get("split", "test"), o.get("name"))
    if spec.type == "pairs":
        sep = {"TAB": "\t", "tab": "\t", "\\t": "\t"}.get(o.get("sep", "\t"), o.get("sep", "\t"))
        return pairs_csv(spec.path, sep, o.get("img", "filepath"), o.get("caption", "title"),
                         o.get("name"))
    paths = world_paths(spec.path)
    return pairs_csv(paths["pairs_val_csv"], name=o.get("name", "world/val-pairs"))
