"""Tests for the synthetic CLIP world generator (clipworld/generate.py)."""
import csv
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipworld import generate as world
from clipworld.generate import CLASSES, DOMAINS, caption_fields, class_folder, generate_world

OPTS = dict(image_size=32, per_class_domain=3, compositional_per_class=4, pretrain_per_class_domain=3)


def _hashes(root):
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, generate_world(root, seed=0, **OPTS)


def test_constants():
    assert DOMAINS == ("photo", "sketch", "cartoon", "painting")
    assert len(CLASSES) >= 10 and len(set(CLASSES)) == len(CLASSES)
    assert world.DOMAINBED_DIRNAME == "clip_world"
    assert class_folder("half moon") == "half_moon"
    # class order equals the sorted folder order ImageFolder uses
    assert [class_folder(c) for c in CLASSES] == sorted(class_folder(c) for c in CLASSES)


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 0), (b, 0), (c, 1)):
        generate_world(root, seed=seed, **OPTS)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha.keys() == hb.keys()
    for rel in ha:
        if rel.endswith(".csv") or rel == world.MARKER:  # these hold absolute paths
            ta = (a / rel).read_text().replace(str(a.resolve()), "ROOT")
            tb = (b / rel).read_text().replace(str(b.resolve()), "ROOT")
            assert ta == tb, rel
        else:
            assert ha[rel] == hb[rel], rel
    pngs = [r for r in ha if r.startswith("domainbed") and r.endswith(".png")]
    differ = sum(ha[r] != hc[r] for r in pngs)
    assert differ == len(pngs)


def test_domainbed_layout(w):
    root, paths = w
    ds_root = Path(paths["domainbed_dataset"])
    assert ds_root == root.resolve() / "domainbed" / "clip_world"
    n = OPTS["per_class_domain"]
    for dom in DOMAINS:
        assert sorted(p.name for p in (ds_root / dom).iterdir()) == \
            sorted(class_folder(c) for c in CLASSES)
        for cls in CLASSES:
            pngs = sorted((ds_root / dom / class_folder(cls)).glob("*.png"))
            assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(n)]
            for p in pngs:
                im = Image.open(p)
                assert im.mode == "RGB" and im.size == (32, 32)
                mask = np.load(p.with_name(p.stem + "_mask.npy"))
                assert mask.shape == (32, 32) and mask.any()


def test_imagefolder_sees_only_pngs(w):
    datasets = pytest.importorskip("torchvision.datasets")
    root, paths = w
    for dom in DOMAINS:
        ds = datasets.ImageFolder(str(Path(paths["domainbed_dataset"]) / dom))
        assert ds.classes == sorted(class_folder(c) for c in CLASSES)
        assert len(ds) == len(CLASSES) * OPTS["per_class_domain"]
        assert all(p.endswith(".png") for p, _ in ds.samples)


def _check_split(split, img_dir, with_domain):
    parts = [{x[0] for x in split[k]} for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert {x[2] for x in split["train"]} == set(CLASSES)
    for k in ("train", "val", "test"):
        for item in split[k]:
            assert len(item) == (4 if with_domain else 3)
            rel, label, cname = item[:3]
            assert isinstance(label, int) and CLASSES[label] == cname
            assert (img_dir / rel).is_file()
            if with_domain:
                assert item[3] in DOMAINS and rel.startswith(item[3] + "/")


def test_coop_splits(w):
    root, paths = w
    pets = Path(paths["coop_oxford_pets"])
    assert (pets / "annotations").is_dir()
    split = json.loads((pets / "split_zhou_OxfordPets.json").read_text())
    _check_split(split, pets / "images", with_domain=False)
    n = sum(len(v) for v in split.values())
    assert n == len(CLASSES) * OPTS["per_class_domain"]  # photo domain only
    assert all("/" not in x[0] for v in split.values() for x in v)  # flat folder
    cw = Path(paths["coop_clip_world"])
    split = json.loads((cw / "split_clip_world.json").read_text())
    _check_split(split, cw / "images", with_domain=True)
    assert {x[3] for v in split.values() for x in v} == set(DOMAINS)


def test_metadata_and_captions(w):
    root, _ = w
    recs = [json.loads(l) for l in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(recs) == len(CLASSES) * (len(DOMAINS) * 3 + 4 + 3 * OPTS["pretrain_per_class_domain"])
    for r in recs:
        assert (root / r["path"]).is_file()
        f = caption_fields(r["caption"])
        assert all(f[k] == r[k] for k in f)
        assert r["caption"] == world.make_caption(r)


def test_compositional_negatives(w):
    root, paths = w
    meta = {json.loads(l)["path"]: json.loads(l)
            for l in (root / "metadata.jsonl").read_text().splitlines()}
    allowed = {"replace_att": {"colour"}, "replace_obj": {"class"}, "replace_rel": {"relation"}}
    for kind, fields in allowed.items():
        items = json.loads(Path(paths[f"compositional_{kind}"]).read_text())
        assert items and list(items) == [str(i) for i in range(len(items))]
        for it in items.values():
            assert it["filename"].startswith("compositional/images/")
            assert (root / it["filename"]).is_file()
            m = meta[it["filename"]]
            assert it["caption"] == m["caption"] != it["negative_caption"]
            pos, neg = caption_fields(it["caption"]), caption_fields(it["negative_caption"])
            changed = {k for k in pos if pos[k] != neg[k]}
            assert len(changed) == 1 and changed <= fields, (kind, changed)
            if kind == "replace_rel":
                assert m["relation"] is not None


def test_pairs_csv_and_shards(w):
    root, paths = w
    n_pool = len(CLASSES) * 3 * OPTS["pretrain_per_class_domain"]  # photo/sketch/cartoon only
    rows = {}
    for name in ("train", "val"):
        text = Path(paths[f"pairs_{name}_csv"]).read_text()
        assert text.splitlines()[0] == "filepath\ttitle"
        rows[name] = list(csv.DictReader(text.splitlines(), delimiter="\t"))
        for r in rows[name]:
            assert Path(r["filepath"]).is_file() and "painting" not in r["filepath"]
            assert Path(r["filepath"]).relative_to(root.resolve() / "pairs" / "images")
            assert caption_fields(r["title"])["domain"] in DOMAINS[:3]
        assert paths[f"num_{name}_samples"] == len(rows[name])
    images = {name: {r["filepath"] for r in part} for name, part in rows.items()}
    assert not images["train"] & images["val"]  # an image and its captions on one side
    assert len(images["train"]) + len(images["val"]) == n_pool
    assert len(images["val"]) == round(0.1 * n_pool)
    by_image = {}
    for r in rows["train"] + rows["val"]:
        by_image.setdefault(r["filepath"], []).append(caption_fields(r["title"]))
    for fields in by_image.values():  # the full caption and the short one, same class
        full, short = sorted(fields, key=lambda f: f["size"] is None)
        assert full["size"] and short["size"] is None and full["class"] == short["class"]
        assert world.make_caption(short) == f"a {short['domain']} of " \
            f"{'an' if short['class'][0] in 'aeiou' else 'a'} {short['class']}."
    shards = sorted(Path(paths["pairs_train_csv"]).parent.glob("shards/train-*.tar"))
    assert len(shards) == paths["num_shards"] >= 1
    keys, captions = [], []
    for sh in shards:
        with tarfile.open(sh) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
            names = [m.name for m in members]
            stems = sorted({n.rsplit(".", 1)[0] for n in names})
            assert sorted(names) == sorted(f"{s}.{e}" for s in stems for e in ("png", "txt"))
            for s in stems:
                Image.open(tar.extractfile(f"{s}.png")).verify()
                captions.append(tar.extractfile(f"{s}.txt").read().decode())
                caption_fields(captions[-1])
            keys += stems
    assert len(keys) == len(set(keys)) == paths["num_train_samples"]
    assert sorted(captions) == sorted(r["title"] for r in rows["train"])


def test_rerun_noop_and_regenerate(tmp_path):
    opts = dict(OPTS)
    p1 = generate_world(tmp_path, seed=0, **opts)
    marker = tmp_path / world.MARKER
    stamp = marker.stat().st_mtime_ns
    img = Path(p1["domainbed_dataset"]) / "photo" / "circle" / "00002.png"
    img_stamp = img.stat().st_mtime_ns
    assert generate_world(tmp_path, seed=0, **opts) == p1
    assert marker.stat().st_mtime_ns == stamp and img.stat().st_mtime_ns == img_stamp
    # changed options: fresh state, stale files gone, marker updated
    opts.update(per_class_domain=2, image_size=24)
    generate_world(tmp_path, seed=0, **opts)
    assert not img.exists()
    assert Image.open(img.with_name("00001.png")).size == (24, 24)
    assert json.loads(marker.read_text())["options"]["per_class_domain"] == 2
    # a missing marker (crash) also triggers regeneration
    marker.unlink()
    generate_world(tmp_path, seed=0, **opts)
    assert marker.exists()


def test_shards_read_with_webdataset(w):
    wds = pytest.importorskip("webdataset", reason="webdataset not installed (pip install -e .[test])")
    _, paths = w
    pairs = list(wds.WebDataset(paths["shards_pattern"], shardshuffle=False)
                 .decode("pil").to_tuple("png", "txt"))
    assert len(pairs) == paths["num_train_samples"]
    image, caption = pairs[0]
    assert image.size == (OPTS["image_size"],) * 2 and caption_fields(caption)
