"""One reader per public data format, one dataset-spec parser and one error class, shared
by the pretraining evaluation (pretraining/datasets.py) and ComAlign
(algorithms/comalign/data.py, regions.py). Readers return what the file says (rows in
file order); grouping captions by image, caption limits and set names are the callers'.

Formats:
- image-caption CSV/TSV (open_clip_train's `--dataset-type csv`: columns `filepath`,
  `title`): read_caption_csv;
- COCO captions (captions_*.json) and instances (instances_*.json): read_coco_captions,
  read_coco_instances;
- Karpathy splits (dataset_coco.json, dataset_flickr30k.json): read_karpathy;
- SugarCrepe ({"<id>": {filename, caption, negative_caption}} per subset): read_sugarcrepe;
- ARO VG-Relation / VG-Attribution ([{image_path, bbox_x/y/w/h, true_caption,
  false_caption}]): read_aro;
- class folders (torchvision ImageFolder, with a "<folder> <class name>" file):
  image_folder, read_classnames;
- CIFAR-10/100 (torchvision's python batches, read by an arrays-only unpickler): cifar.

Dataset specs are `TYPE:PATH[,KEY=VALUE...]` (parse_spec). Bad input raises DataError (a
common.cli.InputError), one line naming the file (and line, where there is one).
Imports nothing heavy at module level."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import InputError

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                      "swap_att", "swap_obj")
TABS = {"TAB": "\t", "tab": "\t", "\\t": "\t"}


class DataError(InputError):
    """Bad data input: one line naming what and where."""


# --------------------------------------------------------------------------- specs, files
@dataclass
class Spec:
    type: str
    path: str
    options: dict = field(default_factory=dict)
    text: str = ""

    def need(self, key: str) -> str:
        """The option `key`, or a DataError saying the spec needs it."""
        if key not in self.options:
            raise DataError(f"dataset spec {self.text!r}: needs {key}=DIR "
                            f"(TYPE:PATH,{key}=...)")
        return self.options[key]


def parse_spec(text: str, allowed, what: str = "") -> Spec:
    """'TYPE:PATH[,KEY=VALUE...]' -> Spec, TYPE one of `allowed` (`what` names the kind
    of set in the message: "pair set"). Commas inside PATH are not supported."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest or rest.startswith(","):
        raise DataError(f"dataset spec {text!r}: expected TYPE:PATH[,KEY=VALUE...] "
                        f"with TYPE one of {', '.join(allowed)}")
    if kind not in allowed:
        raise DataError(f"dataset spec {text!r}: unknown {what + ' ' if what else ''}type "
                        f"{kind!r} (here: {', '.join(allowed)})")
    path, *opts = rest.split(",")
    options = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq:
            raise DataError(f"dataset spec {text!r}: option {opt!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return Spec(kind, os.path.expanduser(path), options, text)


def need_dir(path, what) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder ({what})")
    return path


def need_file(path, what) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what})")
    return path


def read_json(path, what):
    path = need_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not JSON ({what}): {e}") from None


def read_rgb(path):
    """An image file as an RGB PIL image; an unreadable file is a DataError naming it."""
    from PIL import Image

    from common import cli
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({cli.image_problem(path, e)})") from None


# --------------------------------------------------------------------------- image-caption
def read_caption_csv(path, sep=None, img_key="filepath", caption_key="title",
                     relative_to=None) -> list[tuple[str, str]]:
    """open_clip_train's CSV/TSV -> [(image path, caption)] in file order. `sep`: the
    column separator (TAB/tab/\\t name a tab; None: a tab when the header has one, else
    a comma). A relative image path stays as written (open_clip_train reads it from the
    working folder) unless `relative_to` names the folder it is relative to."""
    path = need_file(path, "image-caption CSV")
    try:
        text = path.read_bytes().decode("utf-8")  # newlines as written (csv reads them)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (image-caption CSV): {e}") from None
    if not text.strip():
        raise DataError(f"{path}: empty (needs a header row with columns {img_key!r} and "
                        f"{caption_key!r})")
    sep = TABS.get(sep, sep) or ("\t" if "\t" in text.splitlines()[0] else ",")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    rows = []
    try:
        cols = reader.fieldnames or []
        for key in (img_key, caption_key):
            if key not in cols:
                raise DataError(f"{path}: no column {key!r} "
                                f"(columns: {', '.join(map(repr, cols))})")
        for r in reader:
            if r[img_key] is None or r[caption_key] is None:
                raise DataError(f"{path}:{reader.line_num}: a row without {img_key!r} or "
                                f"{caption_key!r}")
            image = r[img_key]
            if relative_to is not None and not Path(image).is_absolute():
                image = str(Path(relative_to) / image)
            rows.append((image, r[caption_key]))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a CSV file ({e})") from None
    return rows


def read_coco_captions(path, images_dir, by_image_id=False) -> list[tuple[str, str]]:
    """COCO captions JSON (images[{id, file_name}], annotations[{image_id, caption}]) ->
    [(images_dir/file_name, stripped caption)] in annotation order, or grouped by image
    id (ascending; annotation order within an image) with `by_image_id`."""
    data = read_json(path, "COCO captions JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not COCO captions (needs lists 'images' and 'annotations')")
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        rows = []
        for a in data["annotations"]:
            if a["image_id"] not in files:
                raise DataError(f"{path}: annotation for image_id {a['image_id']!r} not in "
                                f"'images'")
            rows.append((a["image_id"], str(Path(images_dir) / files[a["image_id"]]),
                         a["caption"].strip()))
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not COCO captions (an image needs 'id' and 'file_name', "
                        f"an annotation 'image_id' and a string 'caption'; "
                        f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None
    if by_image_id:
        try:
            rows.sort(key=lambda r: r[0])  # stable: annotation order within an image
        except TypeError:
            raise DataError(f"{path}: not COCO captions (image ids of mixed types)") from None
    return [(image, caption) for _, image, caption in rows]


def read_coco_instances(path) -> tuple[dict, dict]:
    """COCO instances JSON -> ({file_name: image entry with id, width, height},
    {image id: [[x, y, w, h], ...]})."""
    data = read_json(path, "COCO instances JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not COCO instances (needs lists 'images' and 'annotations')")
    try:
        images = {im["file_name"]: im for im in data["images"]}
        for im in images.values():
            for key in ("id", "width", "height"):
                if key not in im:
                    raise KeyError(key)
        boxes = {}
        for ann in data["annotations"]:
            boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not COCO instances (an image needs 'id', 'file_name', "
                        f"'width' and 'height', an annotation 'image_id' and 'bbox'; "
                        f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None
    return images, boxes


def read_karpathy(path, images_dir, split="test") -> list[tuple[str, str]]:
    """Karpathy's dataset_{coco,flickr30k}.json (images[{filename, [filepath], split,
    sentences[{raw}]}]) -> [(images_dir/filepath/filename, stripped sentence)] of the
    images of `split`, in file order."""
    data = read_json(path, "Karpathy split JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (needs a list 'images')")
    rows = []
    try:
        for im in data["images"]:
            if im["split"] != split:
                continue
            image = Path(images_dir) / im.get("filepath", "") / im["filename"]
            rows += [(str(image), s["raw"].strip()) for s in im["sentences"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a Karpathy split file (an image needs 'filename', "
                        f"'split' and 'sentences' of {{'raw': string}}; "
                        f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None
    if not rows:
        splits = sorted({str(im.get("split")) for im in data["images"] if isinstance(im, dict)})
        raise DataError(f"{path}: no image-caption pairs: no images of split {split!r} "
                        f"(splits: {', '.join(splits)})")
    return rows


# --------------------------------------------------------------------------- compositional
def read_sugarcrepe(path) -> list[tuple[str, str, str]]:
    """One SugarCrepe subset JSON ({"<id>": {filename, caption, negative_caption}}) ->
    [(filename, caption, negative caption)] in file order."""
    data = read_json(path, "SugarCrepe JSON")
    try:
        return [(item["filename"], item["caption"], item["negative_caption"])
                for item in data.values()]
    except (AttributeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a SugarCrepe file (an object of items with "
                        f"'filename', 'caption' and 'negative_caption'; "
                        f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None


def read_aro(path) -> list[dict]:
    """ARO's visual_genome_{relation,attribution}.json -> [{image_path, box (x, y, w, h),
    true_caption, false_caption}] in file order."""
    data = read_json(path, "ARO JSON")
    if not isinstance(data, list):
        raise DataError(f"{path}: not an ARO VG-Relation/VG-Attribution file (a JSON list)")
    try:
        return [{"image_path": item["image_path"],
                 "box": tuple(item[f"bbox_{c}"] for c in "xywh"),
                 "true_caption": item["true_caption"], "false_caption": item["false_caption"]}
                for item in data]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not an ARO VG-Relation/VG-Attribution file (an item needs "
                        f"'image_path', 'bbox_x/y/w/h', 'true_caption' and 'false_caption'; "
                        f"{'missing ' if isinstance(e, KeyError) else ''}{e})") from None


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


def read_classnames(path) -> dict[str, str]:
    """'<folder> <class name>' lines -> {folder: name}, in file order."""
    path = need_file(path, "classnames file")
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
    """Class folders (torchvision ImageFolder, classes = the folders present). Class
    names from `classnames_file` (its folder, or line k for integer folders
    ImageNet-V2-style), else the folder name with '_' -> ' '."""
    from torchvision.datasets import ImageFolder
    directory = need_dir(directory, "image folder dataset")
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


def _md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cifar(kind: str, root, train: bool, name=None) -> ClassificationSet:
    """CIFAR-10/100 from torchvision's files under root (never downloaded). The MD5 sums
    are checked and reported (`md5_ok` in info), not required, so small test copies load."""
    from torchvision import datasets as tvd
    base = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    root = need_dir(root, f"{kind} root")
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
