"""Eslami & de Melo's evaluation as their scripts run it (pretraining/datasets.py's readers
of their datasets, metadata/eslami_evaluation.json, `python -m pretraining.evaluate
--suite`): each reader on small files written here in the released layouts, bad layouts
refused in one line, their class names and templates against open_clip's as used, and
two suites end to end on a tiny random model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from common import readers
from pretraining import datasets as ds
from pretraining import evaluate
from tests.test_pretraining_eval import _one_line_error, write_cifar

META = ds.eslami_metadata()


def image(path, k=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), ((60 * k) % 256, 90, 200)).save(path)
    return path


def spec(text, types=ds.ZEROSHOT_TYPES):
    return readers.parse_spec(text, types)


# --------------------------------------------------------------------------- their lists
def test_their_imagenet_names_and_templates_equal_open_clips_as_used():
    import open_clip
    from algorithms.backbone import text
    # the harness uses open_clip's; theirs (extracted from their file) give the same texts
    assert META["classnames"]["imagenet"] == list(open_clip.IMAGENET_CLASSNAMES)
    assert ds.eslami_classnames("imagenet-sketch") == META["classnames"]["imagenet"]
    theirs = META["templates"]["openai_imagenet"]
    assert len(theirs) == 80 == len(open_clip.OPENAI_IMAGENET_TEMPLATES)
    for name in ("tench", "great white shark", "jack-o'-lantern"):
        assert [t.format(name) for t in theirs] == \
            [t(name) for t in open_clip.OPENAI_IMAGENET_TEMPLATES] == \
            [t.format(name) for t in text.resolve_templates("openai_imagenet")]


def test_their_lists_where_they_differ_are_held_as_they_wrote_them():
    names = META["classnames"]
    assert {k: len(v) for k, v in names.items()} == {
        "cifar10": 10, "cifar100": 100, "flowers-102": 102, "food-101": 101, "imagenet": 1000,
        "imagenet-a": 200, "imagenet-o": 200, "imagenet-r": 200, "stanford-cars": 196}
    assert META["source"]["commit"] and META["source"]["repository"] == "sarahESL/AlignCLIP"
    # CIFAR-100: their plural names, not torchvision's ("apple", "aquarium_fish")
    assert names["cifar100"][:2] == ["apples", "aquarium fish"]
    assert names["imagenet-r"][1] == "great_white_shark"  # their underscores are kept
    assert names["imagenet-o"][4] == "sulphur-crested"     # their first words only
    # Food-101: sorted but for their cheesecake / cheese_plate order (torchvision sorts keys)
    food = names["food-101"]
    assert food != sorted(food) and food[16:18] == ["cheesecake", "cheese_plate"]
    assert food[:16] + food[18:] == sorted(food)[:16] + sorted(food)[18:]


def test_the_extractor_reads_their_file_without_running_it(tmp_path):
    from pretraining.metadata import extract_eslami
    text = ("import os\nos.system('touch pwned')\n"
            "OPENAI_IMAGENET_TEMPLATES = (lambda c: f'a photo of a {c}.', lambda c: f'{c} {{x}}')\n"
            + "".join(f"{n} = ('a', 'b')\n" for n in extract_eslami.CLASSNAMES))
    names, templates = extract_eslami.parse_metadata(text)
    assert templates == {"openai_imagenet": ["a photo of a {}.", "{} {{x}}"]}
    assert names["imagenet-o"] == ["a", "b"] and not Path("pwned").exists()
    with pytest.raises(ValueError, match="no IMAGENET_CLASSNAMES"):
        extract_eslami.parse_metadata(text.replace("IMAGENET_CLASSNAMES", "OTHER"))
    with pytest.raises(ValueError, match="more than the class name"):
        extract_eslami.parse_metadata(text.replace("f'{c} {{x}}'", "f'{c.upper()}'"))


# --------------------------------------------------------------------------- writers
def write_flowers(root, per_split=2):
    """torchvision's Flowers102 files: labels of images 1..3*per_split, tstid the last."""
    base = root / "flowers-102"
    n = 3 * per_split
    labels = np.array([1 + (i % 102) * 50 % 102 for i in range(n)])  # 1-based
    savemat(base.mkdir(parents=True) or base / "imagelabels.mat", {"labels": labels[None]})
    ids = np.arange(1, n + 1)
    savemat(base / "setid.mat", {"trnid": ids[:per_split][None], "valid": ids[per_split:2 * per_split][None],
                                 "tstid": ids[2 * per_split:][None]})
    for i in ids:
        image(base / "jpg" / f"image_{i:05d}.jpg", i)
    return root, labels


def write_food(root, per_class=1, classes=3):
    """torchvision's Food101 files; all 101 classes in the split JSON, images of a few."""
    base = root / "food-101"
    keys = META["classnames"]["food-101"]  # their order; the dataset's keys are the same names
    meta = {c: [f"{c}/{100 + j}" for j in range(per_class)] if k < classes or c == "cheesecake"
            else [] for k, c in enumerate(reversed(keys))}
    for split in ("train", "test"):
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    for rel in (r for v in meta.values() for r in v):
        image(base / "images" / f"{rel}.jpg")
    return root


def write_cars(root):
    """torchvision's StanfordCars files with (fname, class) annotation structs."""
    base = root / "stanford_cars"
    annos = np.array([("00001.jpg", 1), ("00002.jpg", 196), ("00003.jpg", 5)],
                     dtype=[("fname", "O"), ("class", "O")])
    (base / "devkit").mkdir(parents=True)
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos[None]})
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos[:2][None]})
    names = np.array([f"Car {k}" for k in range(196)], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None]})
    for split in ("cars_test", "cars_train"):
        for k, (f, _) in enumerate(annos):
            image(base / split / f, k)
    return root


def write_wnid_folders(root, n, with_images=(0, 3)):
    """n class folders n00000000.. (sorted = label order), images in a few."""
    for k in range(n):
        (root / f"n{k:08d}").mkdir(parents=True)
    for k in with_images:
        image(root / f"n{k:08d}" / "a.JPEG", k)
        image(root / f"n{k:08d}" / "b.png", k)
    return root


def write_captions(root):
    """COCO captions_val2017.json (6 captions of one image) and their flickr30k_test.json."""
    for k in range(3):
        image(root / "val2017" / f"{k:012d}.jpg", k)
    coco = {"images": [{"id": 2, "file_name": f"{2:012d}.jpg"}, {"id": 1, "file_name": f"{1:012d}.jpg"}],
            "annotations": [{"image_id": 1, "caption": f"one {j}", "id": j} for j in range(6)]
            + [{"image_id": 2, "caption": "two", "id": 9}]}
    (root / "captions_val2017.json").write_text(json.dumps(coco))
    (root / "flickr").mkdir()
    flickr = [{"image": f"flickr30k-images/{k}.jpg", "caption": [f"c{k}{j} " for j in range(5 + k)]}
              for k in range(3)]
    for k in range(3):
        image(root / "flickr" / "flickr30k-images" / f"{k}.jpg", k)
    (root / "flickr30k_test.json").write_text(json.dumps(flickr))
    return root


# --------------------------------------------------------------------------- readers
def test_flowers_reader_reads_the_test_split_with_their_names(tmp_path):
    root, labels = write_flowers(tmp_path)
    s = ds.zeroshot_sets(spec(f"flowers-102:{root}"))[0]
    assert s.name == "flowers-102" and s.classnames == META["classnames"]["flowers-102"]
    assert [Path(f).name for f in s.files] == ["image_00005.jpg", "image_00006.jpg"]
    assert s.labels == list(labels[4:] - 1) and s.info == {"split": "test", "md5_ok": False}
    train, tests = ds.linear_probe_sets(spec(f"flowers-102:{root}", ds.LINEAR_PROBE_TYPES))
    assert train.labels == list(labels[:2] - 1) and tests[0].labels == s.labels
    (root / "flowers-102" / "jpg" / "image_00006.jpg").unlink()
    with pytest.raises(readers.DataError, match="image_00006.jpg: no such image file"):
        ds.flowers102(root)
    savemat(root / "flowers-102" / "setid.mat", {"trnid": np.arange(1, 3)[None]})
    with pytest.raises(readers.DataError, match="setid.mat: no 'tstid'"):
        ds.flowers102(root)
    (root / "flowers-102" / "setid.mat").write_text("not a mat file")
    with pytest.raises(readers.DataError, match="setid.mat: not a MATLAB file"):
        ds.flowers102(root)


def test_food_reader_labels_by_sorted_keys_with_their_names(tmp_path):
    root = write_food(tmp_path)
    s = ds.zeroshot_sets(spec(f"food-101:{root}"))[0]
    keys = sorted(META["classnames"]["food-101"])
    assert len(s) == 4 and s.classnames == META["classnames"]["food-101"]
    # labels are ranks of the sorted keys (torchvision), whatever the JSON's order
    assert sorted({keys[l] for l in s.labels}) == sorted(
        {"waffles", "tuna_tartare", "tiramisu", "cheesecake"})
    cheesecake = s.labels[[Path(f).parent.name for f in s.files].index("cheesecake")]
    assert keys[cheesecake] == "cheesecake" and s.classnames[cheesecake] == "cheese_plate"
    dataset = ds.zeroshot_sets(spec(f"food-101:{root},classnames=dataset"))[0]
    assert dataset.classnames == keys and dataset.labels == s.labels
    meta = root / "food-101" / "meta" / "test.json"
    meta.write_text(json.dumps({"apple_pie": ["apple_pie/1"]}))
    with pytest.raises(readers.DataError, match="1 classes, but the class-name list has 101"):
        ds.food101(root, theirs=True)
    meta.write_text(json.dumps(["apple_pie/1"]))
    with pytest.raises(readers.DataError, match="test.json: not a Food-101 split"):
        ds.food101(root)


def test_stanford_cars_reader_reads_mat_annotations(tmp_path):
    root = write_cars(tmp_path)
    s = ds.zeroshot_sets(spec(f"stanford-cars:{root}"))[0]
    assert s.labels == [0, 195, 4] and s.classnames == META["classnames"]["stanford-cars"]
    assert [Path(f).name for f in s.files] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    own = ds.zeroshot_sets(spec(f"stanford-cars:{root},classnames=dataset"))[0]
    assert own.classnames[195] == "Car 195"
    train, _ = ds.linear_probe_sets(spec(f"stanford-cars:{root}", ds.LINEAR_PROBE_TYPES))
    assert train.labels == [0, 195] and "cars_train" in train.files[0]
    savemat(root / "stanford_cars" / "cars_test_annos_withlabels.mat",
            {"annotations": np.array([("x.jpg",)], dtype=[("fname", "O")])[None]})
    with pytest.raises(readers.DataError, match="annotations need fields 'fname' and 'class'"):
        ds.stanford_cars(root)
    with pytest.raises(readers.DataError, match="classnames= takes eslami or dataset"):
        ds.zeroshot_sets(spec(f"stanford-cars:{root},classnames=mine"))


def test_imagenet_folders_need_as_many_folders_as_their_names(tmp_path):
    r = write_wnid_folders(tmp_path / "imagenet-r", 200, with_images=(0, 199))
    s = ds.zeroshot_sets(spec(f"imagenet-r:{r}"))[0]
    assert s.classnames == META["classnames"]["imagenet-r"] and s.labels == [0, 0, 199, 199]
    assert s.info == {"first_folder": "n00000000", "last_folder": "n00000199"}
    o = ds.zeroshot_sets(spec(f"imagenet-o:{r}"))[0]  # empty class folders still count
    assert o.classnames[4] == "sulphur-crested" and len(o) == 4
    sketch = write_wnid_folders(tmp_path / "sketch", 1000, with_images=(7,))
    assert ds.zeroshot_sets(spec(f"imagenet-sketch:{sketch}"))[0].labels == [7, 7]
    with pytest.raises(readers.DataError, match="200 classes, but the class-name list has 1000"):
        ds.zeroshot_sets(spec(f"imagenet-val:{r}"))
    (tmp_path / "flat").mkdir()
    image(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(readers.DataError, match="flat: no class folders"):
        ds.zeroshot_sets(spec(f"imagenet-val:{tmp_path / 'flat'}"))
    # their linear probe: 50 random images per class of train=
    train = write_wnid_folders(tmp_path / "train", 1000, with_images=())
    for j in range(60):
        image(train / "n00000003" / f"{j}.JPEG", j)
    probe = ds.eslami_set(spec(f"imagenet-val:{sketch},train={train}"), "train")
    assert len(probe) == 50 and set(probe.labels) == {3} and probe.info["per_class"] == 50
    with pytest.raises(readers.DataError, match="needs train=DIR"):
        ds.linear_probe_sets(spec(f"imagenet-val:{sketch}", ds.LINEAR_PROBE_TYPES))


def test_imagenet_v2_reads_class_index_folders_as_imagenetv2_pytorch(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val" / "ImageNetV2-matched-frequency"
    for folder in ("0", "10", "2"):  # label = the folder's integer, not its sorted rank
        image(root / folder / "a.jpeg")
    image(root / "2" / "ignored.JPEG")  # the library globs *.jpeg only
    s = ds.zeroshot_sets(spec(f"imagenet-v2:{root.parent}"))[0]
    assert sorted(s.labels) == [0, 2, 10] and s.info == {"complete": False}
    assert all(int(Path(f).parent.name) == l for f, l in zip(s.files, s.labels))
    assert ds.imagenet_v2(root).labels == s.labels  # the class-index folders directly
    image(root / "1000" / "a.jpeg")
    with pytest.raises(readers.DataError, match="'1000' is not a class index 0..999"):
        ds.imagenet_v2(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(readers.DataError, match="no <class index>/\\*.jpeg files"):
        ds.imagenet_v2(tmp_path / "empty")


def test_cifar_takes_their_class_names(tmp_path):
    c100 = write_cifar(tmp_path / "c100", "cifar100")
    with pytest.raises(readers.DataError, match="3 classes, but the class-name list has 100"):
        ds.zeroshot_sets(spec(f"cifar100:{c100},classnames=eslami"))
    c10 = write_cifar(tmp_path / "c10")
    with pytest.raises(readers.DataError, match="classnames= takes dataset or eslami"):
        ds.zeroshot_sets(spec(f"cifar10:{c10},classnames=other"))


def test_retrieval_captions_as_their_scripts_read_them(tmp_path):
    root = write_captions(tmp_path)
    coco = ds.retrieval_set(spec(f"coco:{root / 'captions_val2017.json'},images={root / 'val2017'},"
                                 f"prompt=a photo of {{}},per_image=5", ds.RETRIEVAL_TYPES))
    # by image id, annotation order, the first 5 of image 1's 6, each in their prompt
    assert coco.captions == [f"a photo of one {j}" for j in range(5)] + ["a photo of two"]
    assert coco.text_to_image == [0] * 5 + [1] and coco.info == {"prompt": "a photo of {}",
                                                                  "per_image": 5}
    flickr = ds.retrieval_set(spec(f"flickr:{root / 'flickr30k_test.json'},images={root / 'flickr'}",
                                   ds.RETRIEVAL_TYPES))
    assert [Path(p).name for p in flickr.images] == ["0.jpg", "1.jpg", "2.jpg"]
    assert len(flickr.captions) == 18 and flickr.captions[0] == "c00"
    cut = ds.prompted(flickr, per_image=5)
    assert len(cut.captions) == 15 and cut.text_to_image == [0] * 5 + [1] * 5 + [2] * 5
    (root / "bad.json").write_text(json.dumps([{"image": "0.jpg", "caption": "one string"}]))
    with pytest.raises(readers.DataError, match="bad.json: item 0 is not"):
        ds.flickr_json(root / "bad.json", root / "flickr")
    (root / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(readers.DataError, match="bad.json: not a Flickr caption file"):
        ds.flickr_json(root / "bad.json", root / "flickr")
    for bad, message in (("per_image=0", "per_image= takes a positive integer"),
                         ("prompt=a photo", "prompt= needs one '{}'")):
        with pytest.raises(readers.DataError, match=message):
            ds.retrieval_set(spec(f"flickr:{root / 'flickr30k_test.json'},images={root / 'flickr'},"
                                  f"{bad}", ds.RETRIEVAL_TYPES))


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from pretraining import sharedclip
    torch.manual_seed(0)
    model = sharedclip.create_model_and_transforms("tiny-sharedclip")[0]
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sharedclip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_retrieval_suite_end_to_end(tmp_path, tiny_checkpoint, capsys):
    root = write_captions(tmp_path / "data")
    out = tmp_path / "out"
    code = evaluate.main([
        "--model", "tiny-sharedclip", "--checkpoint", str(tiny_checkpoint), "--quiet",
        "--suite", "eslami-retrieval",
        "--retrieval", f"coco:{root / 'captions_val2017.json'},images={root / 'val2017'}",
        "--retrieval", f"flickr:{root / 'flickr30k_test.json'},images={root / 'flickr'}",
        "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / evaluate.RECORD_NAME).read_text())
    suite = rec["suite"]
    assert suite["name"] == "eslami-retrieval" and suite["script"] == "test_retrieval.sh"
    assert suite["missing"] == [] and suite["their_names"] == {"coco": "ms-coco", "flickr": "flickr"}
    coco, flickr = rec["retrieval"]["coco"], rec["retrieval"]["flickr"]
    assert (coco["n_images"], coco["n_captions"]) == (2, 6)
    assert (flickr["n_images"], flickr["n_captions"]) == (3, 15)  # 5 of 5, 6 and 7 captions
    assert flickr["prompt"] == "a photo of {}" and flickr["per_image"] == 5
    for r in (coco, flickr):  # K >= the candidates: everything found
        assert r["text_to_image"]["R@5"] == 100.0 and 0 <= r["text_to_image"]["R@1"] <= 100
    assert coco["image_to_text"]["R@10"] == 100.0
    assert rec["run"]["config"]["suite"] == "eslami-retrieval"
    # the record's recalls are the ones of the prompted captions' features
    import open_clip
    from pretraining import sharedclip
    model, _, preprocess = sharedclip.create_model_and_transforms(
        "tiny-sharedclip", pretrained=str(tiny_checkpoint))
    s = ds.retrieval_set(spec(f"flickr:{root / 'flickr30k_test.json'},images={root / 'flickr'},"
                              f"prompt=a photo of {{}},per_image=5", ds.RETRIEVAL_TYPES))
    img, txt = evaluate.encode_retrieval(model.eval(), preprocess,
                                         open_clip.get_tokenizer("tiny-sharedclip"), s, "cpu", False)
    assert evaluate.retrieval_recalls(txt @ img.T, s.text_to_image) == \
        {d: {k: v for k, v in flickr[d].items()} for d in ("image_to_text", "text_to_image")}


def test_zeroshot_suite_end_to_end_with_a_part_of_the_script(tmp_path, tiny_checkpoint, capsys):
    cifar, (flowers, _) = write_cifar(tmp_path / "cifar"), write_flowers(tmp_path / "flowers")
    out = tmp_path / "out"
    # write_cifar's 3 classes: their CIFAR-10 names need 10; a 10-class meta is written here
    import pickle
    with open(cifar / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": META["classnames"]["cifar10"]}, f)
    code = evaluate.main([
        "--model", "tiny-sharedclip", "--checkpoint", str(tiny_checkpoint), "--quiet",
        "--suite", "eslami-zeroshot-cls", "--zeroshot", f"cifar10:{cifar}",
        "--zeroshot", f"flowers-102:{flowers}", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / evaluate.RECORD_NAME).read_text())
    assert rec["order"]["zeroshot"] == ["cifar10", "flowers-102"]
    assert rec["suite"]["missing"] == ["cifar100", "imagenet-val", "food-101", "stanford-cars"]
    assert rec["suite"]["their_names"]["flowers-102"] == "flowers102-zeroshot-val"
    fl = rec["zeroshot"]["flowers-102"]
    assert fl["n"] == 2 and fl["num_classes"] == 102 and 0 <= fl["top1"] <= fl["top5"] <= 100
    assert rec["zeroshot"]["cifar10"]["classnames"] == "eslami"
    assert rec["run"]["config"]["suite"] == "eslami-zeroshot-cls"


def test_suites_refuse_what_their_scripts_do_not_run(tmp_path, tiny_checkpoint, capsys):
    root = write_captions(tmp_path / "data")
    cifar = write_cifar(tmp_path / "cifar")
    out = tmp_path / "out"
    base = ["--model", "tiny-sharedclip", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--quiet"]
    flickr = f"flickr:{root / 'flickr30k_test.json'},images={root / 'flickr'}"
    _one_line_error(capsys, evaluate.main(base + ["--suite", "eslami-distribution-shift",
                                                  "--zeroshot", f"cifar10:{cifar}"]),
                    "not a dataset of --suite eslami-distribution-shift",
                    "imagenet-sketch, imagenet-a")
    _one_line_error(capsys, evaluate.main(base + ["--suite", "eslami-retrieval",
                                                  "--retrieval", flickr, "--retrieval", flickr]),
                    "flickr given twice")
    _one_line_error(capsys, evaluate.main(base + ["--suite", "eslami-retrieval",
                                                  "--retrieval", flickr + ",per_image=3"]),
                    "per_image=3 differs from --suite eslami-retrieval")
    _one_line_error(capsys, evaluate.main(base + ["--suite", "eslami-zeroshot-cls",
                                                  "--zeroshot", f"cifar10:{cifar}",
                                                  "--templates", "photo"]),
                    "uses their templates (openai_imagenet)")
    _one_line_error(capsys, evaluate.main(base + ["--suite", "eslami-zeroshot-cls",
                                                  "--zeroshot", f"cifar10:{cifar}"]),
                    "3 classes, but the class-name list has 10")
    _one_line_error(capsys, evaluate.main(base + ["--suite", "eslami-zeroshot-cls",
                                                  "--linear-probe", f"cifar10:{cifar}"]),
                    "zero-shot and retrieval only")
    assert not out.exists()
