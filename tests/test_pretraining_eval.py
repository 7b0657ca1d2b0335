"""pretraining/evaluate.py, datasets.py, modality_gap.py, export.py: the gap measures and
retrieval recall on hand-computed examples, the dataset readers (common/readers.py) and
the evaluation sets made from them on small files written
here (CIFAR pickles, COCO and Karpathy JSON, ImageNet-style folders), the linear probe on a
separable toy set, and the CLI end to end on a tiny random model (record, figure, one-line
errors that leave nothing behind)."""
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import readers
from pretraining import datasets as ds
from pretraining import evaluate, modality_gap

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}


def square(rgb, k, size=40):
    im = Image.new("RGB", (size, size), (240, 240, 240))
    im.paste(rgb, (4 + k, 4 + k, 30 + k, 30 + k))
    return im


# --------------------------------------------------------------------------- gap measures
def test_gap_measures_on_two_pairs_by_hand():
    # images e1, e2; texts e1, e1 (scaled: the measures normalise first)
    image, text = np.array([[3.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 0.0], [5.0, 0.0]])
    m = modality_gap.gap_measures(image, text)
    assert m["n"] == 2
    assert m["centroid_distance"] == pytest.approx(math.sqrt(0.5))  # (.5,.5) - (1,0)
    assert m["alignment_score"] == pytest.approx(0.5)                # cos 1 and 0
    assert m["separation_score"] == pytest.approx(0.75)              # C=[[1,1],[0,0]] -> 1 - 1/4
    assert m["mean_unpaired_cosine"] == pytest.approx(0.5)           # (1 + 0) / 2
    assert m["uniformity_image"] == pytest.approx(-4.0)              # log exp(-2 * 2)
    assert m["uniformity_text"] == pytest.approx(0.0)                # identical: log exp(0)


def test_gap_measures_on_three_orthonormal_pairs():
    eye = np.eye(3)
    assert modality_gap.centroid_distance(eye, eye) == pytest.approx(0.0)
    assert modality_gap.alignment_score(eye, eye) == pytest.approx(1.0)
    assert modality_gap.separation_score(eye, eye) == pytest.approx(1.0)
    assert modality_gap.uniformity(eye) == pytest.approx(-4.0)
    # texts = images rotated by one: nothing aligned, every off-diagonal pair of one kind
    rolled = np.roll(eye, 1, axis=0)
    assert modality_gap.alignment_score(eye, rolled) == pytest.approx(0.0)
    assert modality_gap.separation_score(eye, rolled) == pytest.approx(1 - 3 / 9)
    with pytest.raises(ValueError, match="differ in shape"):
        modality_gap.alignment_score(eye, eye[:2])


def test_projection_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    path = modality_gap.projection_figure(
        [("a", rng.normal(size=(20, 8)), rng.normal(size=(20, 8))),
         ("b", rng.normal(size=(20, 8)), rng.normal(size=(20, 8)))], tmp_path / "p.png")
    assert path.is_file() and Image.open(path).size[0] > 400


# --------------------------------------------------------------------------- retrieval
def test_retrieval_recall_with_several_captions_per_image():
    # 3 images; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2. S[text, image]:
    sim = torch.tensor([[0.9, 0.1, 0.0],   # t0: own image first
                        [0.2, 0.8, 0.1],   # t1: own image 2nd
                        [0.1, 0.3, 0.5],   # t2: own image 2nd
                        [0.7, 0.2, 0.1],   # t3: own image 2nd
                        [0.3, 0.6, 0.4]])  # t4: own image 2nd
    r = evaluate.retrieval_recalls(sim, [0, 0, 1, 1, 2], ks=(1, 2, 5))
    assert r["text_to_image"] == pytest.approx({"R@1": 20.0, "R@2": 100.0, "R@5": 100.0}, abs=1e-3)
    # image columns: img0 best t0 (own); img1 ranks t1, t4, t2(own): 3rd; img2 t2, t4(own): 2nd
    assert r["image_to_text"] == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@5": 100.0},
                                               abs=1e-3)


def test_retrieval_recall_counts_ties_against_the_query():
    # the hand-computed tie case of tests/test_comalign.py (one rule, common/retrieval.py):
    # images e0, e1; captions u, u, e1 of images 0, 1, 1 (u = (e0 + e1)/sqrt2). S[text, image]:
    sim = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    r = evaluate.retrieval_recalls(sim, [0, 1, 1], ks=(1, 2))
    # text->image: captions 0, 1 tie between both images (found at 2), caption 2 at 1
    assert r["text_to_image"] == pytest.approx({"R@1": 100 / 3, "R@2": 100.0}, abs=1e-3)
    # image->text: image 0's caption ties with caption 1 (found at 2); image 1 at 1
    assert r["image_to_text"] == pytest.approx({"R@1": 50.0, "R@2": 100.0}, abs=1e-3)
    # a model that scores everything alike finds nothing at 1
    flat = evaluate.retrieval_recalls(torch.zeros(3, 2), [0, 1, 1], ks=(1,))
    assert flat == {"text_to_image": {"R@1": 0.0}, "image_to_text": {"R@1": 0.0}}


def test_topk_accuracy_has_no_top5_with_few_classes():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert evaluate.topk_accuracy(logits, torch.tensor([1, 1, 1])) == \
        {"top1": pytest.approx(200 / 3, abs=1e-3), "top5": None}


# --------------------------------------------------------------------------- readers
def write_cifar(root, kind="cifar10", per_batch=4):
    """torchvision's CIFAR layout with tiny batches (pickled dicts, uint8 N x 3072)."""
    rng = np.random.default_rng(0)
    if kind == "cifar10":
        folder, label_key = Path(root) / "cifar-10-batches-py", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {"label_names": ["airplane", "automobile", "bird"]}
    else:
        folder, label_key = Path(root) / "cifar-100-python", "fine_labels"
        files = ["train", "test"]
        meta_name, meta = "meta", {"fine_label_names": ["apple", "aquarium_fish", "baby"]}
    folder.mkdir(parents=True)
    for k, name in enumerate(files):
        labels = [(k + i) % 3 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = np.array(labels)[:, None] * 100  # red channel = 100 * label
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return Path(root)


def test_cifar_readers_on_small_pickles(tmp_path):
    root = write_cifar(tmp_path / "c10")
    test = readers.cifar("cifar10", root, train=False)
    assert test.classnames == ["airplane", "automobile", "bird"]
    assert len(test) == 4 and test.labels == [(5 + i) % 3 for i in range(4)]
    assert test.info == {"split": "test", "md5_ok": False}
    image, label = test.torch_dataset(lambda im: np.asarray(im))[1]
    assert image.shape == (32, 32, 3) and label == test.labels[1]
    assert (image[..., 0] == 100 * label).all()
    train, tests = ds.linear_probe_sets(readers.parse_spec(f"cifar10:{root}", ds.LINEAR_PROBE_TYPES))
    assert len(train) == 20 and len(tests[0]) == 4
    c100 = readers.cifar("cifar100", write_cifar(tmp_path / "c100", "cifar100"), train=True)
    assert c100.classnames == ["apple", "aquarium fish", "baby"] and len(c100) == 4
    with pytest.raises(readers.DataError, match="test_batch: no such file"):
        (root / "cifar-10-batches-py" / "test_batch").unlink()
        readers.cifar("cifar10", root, train=False)


def write_images(folder, names, k0=0):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        square(list(COLOURS.values())[k % 3], (k0 + k) % 6).save(folder / name)


def test_coco_and_karpathy_readers(tmp_path):
    write_images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "img" / "val").mkdir()
    write_images(tmp_path / "img" / "val", ["d.jpg"])
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "caption": "red one ", "id": 1},
                            {"image_id": 3, "caption": "green one", "id": 2},
                            {"image_id": 7, "caption": "a red square", "id": 3}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    s = ds.retrieval_set(readers.parse_spec(f"coco:{tmp_path / 'captions_val2017.json'},"
                                       f"images={tmp_path / 'img'}", ds.RETRIEVAL_TYPES))
    assert [Path(p).name for p in s.images] == ["b.jpg", "a.jpg"]  # by image id
    assert s.captions == ["green one", "red one", "a red square"]
    assert s.text_to_image == [0, 1, 1] and s.image_to_texts() == [[0], [1, 2]]
    assert s.first_caption_pairs() == [(0, 0), (1, 1)]

    karpathy = {"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}, {"raw": "y"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "z"}]},
        {"filepath": "val", "filename": "d.jpg", "split": "test", "sentences": [{"raw": "w"}]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    k = ds.karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "img")
    assert k.name == "flickr30k-test" and k.captions == ["x", "y", "w"]
    assert k.text_to_image == [0, 0, 1] and k.images[1].endswith("img/val/d.jpg")
    assert ds.karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "img", "train").captions == ["z"]
    with pytest.raises(readers.DataError, match="no images of split 'val'"):
        ds.karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "img", "val")
    # wrong layouts name the file
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    with pytest.raises(readers.DataError, match="bad.json: not COCO captions"):
        ds.coco_captions(tmp_path / "bad.json", tmp_path / "img")
    (tmp_path / "bad2.json").write_text(json.dumps({"images": [{"filename": "a.jpg"}]}))
    with pytest.raises(readers.DataError, match="bad2.json: not a Karpathy split file"):
        ds.karpathy(tmp_path / "bad2.json", tmp_path / "img")
    coco["images"][0]["file_name"] = "missing.jpg"
    (tmp_path / "c2.json").write_text(json.dumps(coco))
    with pytest.raises(readers.DataError, match="missing.jpg: no such image file"):
        ds.coco_captions(tmp_path / "c2.json", tmp_path / "img")


def test_imagenet_style_folders_with_class_subsets(tmp_path):
    names = tmp_path / "classnames.txt"
    names.write_text("n01 tench\nn02 goldfish\nn03 great white shark\nn04 tiger shark\n")
    for wnid in ("n02", "n04"):  # an ImageNet-R-like subset of the mapping
        write_images(tmp_path / "r" / wnid, ["0.png", "1.png"])
    s = readers.image_folder(tmp_path / "r", names)
    assert s.classnames == ["goldfish", "tiger shark"] and s.labels == [0, 0, 1, 1]
    assert s.info == {"classes_of_mapping": 4}
    for index in ("0", "2"):  # ImageNet-V2: folders are class indices
        write_images(tmp_path / "v2" / index, ["0.png"])
    assert readers.image_folder(tmp_path / "v2", names).classnames == ["tench", "great white shark"]
    write_images(tmp_path / "plain" / "half_moon", ["0.png"])
    assert readers.image_folder(tmp_path / "plain").classnames == ["half moon"]
    write_images(tmp_path / "odd" / "n09", ["0.png"])
    with pytest.raises(readers.DataError, match="no class name for folder 'n09'"):
        readers.image_folder(tmp_path / "odd", names)


def test_linear_probe_learns_a_separable_toy_set():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 3
    y = rng.integers(0, 3, size=300)
    x = centres[y] + rng.normal(scale=0.3, size=(300, 8))
    clf = evaluate.train_linear_probe(x[:200], y[:200], 3, batch_size=32, progress=False)
    with torch.no_grad():
        acc = evaluate.topk_accuracy(clf(torch.tensor(x[200:], dtype=torch.float32)),
                                     torch.tensor(y[200:]))
    assert acc["top1"] == 100.0
    # the reference's optimiser groups: weight decay on the weight only
    assert clf.weight.shape == (3, 8)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from pretraining import sharedclip
    torch.manual_seed(0)
    model = sharedclip.create_model_and_transforms("tiny-sharedclip")[0]
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sharedclip.pt"
    torch.save(model.state_dict(), path)
    return path


def small_data(root: Path) -> dict:
    """A 3-class folder dataset (train/test), a pairs CSV, a COCO and a Karpathy JSON."""
    for split, k0 in (("train", 0), ("test", 3)):
        for colour in COLOURS:
            write_images(root / split / f"{colour}_square", [f"{i}.png" for i in range(3)], k0)
    rows = ["filepath\ttitle"]
    for colour in COLOURS:
        for i in range(2):
            path = root / "test" / f"{colour}_square" / f"{i}.png"
            rows += [f"{path}\ta {colour} square.", f"{path}\ta photo of a {colour} square."]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    images = [{"id": i, "file_name": f"{c}_square/0.png"} for i, c in enumerate(COLOURS)]
    anns = [{"image_id": i, "caption": f"a {c} square", "id": i} for i, c in enumerate(COLOURS)]
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    kp = [{"filename": "0.png", "filepath": f"{c}_square", "split": "test",
           "sentences": [{"raw": f"a {c} square"}, {"raw": f"{c}"}]} for c in COLOURS]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": kp}))
    return {"train": root / "train", "test": root / "test", "pairs": root / "pairs.csv",
            "coco": root / "coco.json", "karpathy": root / "dataset_flickr30k.json"}


def test_cli_end_to_end_writes_one_record_and_a_figure(tmp_path, tiny_checkpoint, capsys):
    d = small_data(tmp_path / "data")
    cifar = write_cifar(tmp_path / "cifar")
    out = tmp_path / "out"
    code = evaluate.main([
        "--model", "tiny-sharedclip", "--checkpoint", str(tiny_checkpoint), "--quiet",
        "--zeroshot", f"folder:{d['test']},name=squares", "--zeroshot", f"cifar10:{cifar}",
        "--retrieval", f"pairs:{d['pairs']}", "--retrieval", f"coco:{d['coco']},images={d['test']}",
        "--retrieval", f"karpathy:{d['karpathy']},images={d['test']}",
        "--linear-probe", f"folder:{d['train']},test={d['test']},name=squares",
        "--probe-epochs", "4", "--gap", f"pairs:{d['pairs']},captions=all", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / evaluate.RECORD_NAME).read_text())
    assert rec["kind"] == "pretraining_eval" and rec["method"] == "SharedCLIP" and rec["tied"]
    from common.run_facts import check_facts, file_digest
    run = check_facts(rec["run"], "record")
    assert (run["protocol"], run["stage"], run["method"]) == ("pretraining", "eval", "SharedCLIP")
    assert (run["backbone"], run["precision"]) == ("tiny-sharedclip", "fp32")
    assert run["weights_digest"] == file_digest(tiny_checkpoint) and run["seeds"] == {"seed": 0}
    assert run["config"]["retrieval"][0] == f"pairs:{d['pairs']}" and f"cifar10:{cifar}" in run["dataset"]
    assert rec["checkpoint"] == str(tiny_checkpoint.resolve())
    assert rec["order"]["zeroshot"] == ["squares", "cifar10"]
    zs = rec["zeroshot"]["squares"]
    assert zs["n"] == 9 and zs["num_classes"] == 3 and 0 <= zs["top1"] <= 100 and zs["top5"] is None
    assert rec["zeroshot"]["cifar10"]["n"] == 4 and rec["zeroshot"]["cifar10"]["md5_ok"] is False
    assert set(rec["retrieval"]) == {"pairs", "coco", "flickr30k-test"}
    pairs = rec["retrieval"]["pairs"]
    assert (pairs["n_images"], pairs["n_captions"]) == (6, 12)
    for direction in ("image_to_text", "text_to_image"):
        assert set(pairs[direction]) == {"R@1", "R@5", "R@10"}
        assert pairs[direction]["R@10"] == 100.0  # k >= number of candidates
    assert rec["linear_probe"]["squares"]["n_train"] == 9 and rec["linear_probe"]["squares"]["epochs"] == 4
    gap = rec["gap"]["pairs"]
    assert gap["n"] == 12 and gap["captions"] == "all" and -1 <= gap["alignment_score"] <= 1
    assert (out / gap["figure"]).is_file() and rec["figures"] == [gap["figure"]]
    arrays = np.load(out / gap["embeddings"])
    assert arrays["image"].shape == (12, 64)
    # the measures recomputed from the saved embeddings
    assert modality_gap.alignment_score(arrays["image"], arrays["text"]) == \
        pytest.approx(gap["alignment_score"], abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [evaluate.RECORD_NAME, gap["figure"], gap["embeddings"]])


def test_method_is_read_from_the_training_log(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    assert evaluate.infer_method("tiny-sharedclip", ckpt) == "SharedCLIP"
    assert evaluate.infer_method("tiny-clip-w64", ckpt) == "CLIP"
    (tmp_path / "run" / "out.log").write_text("INFO | AlignCLIP-IMSep: IMSepLoss(alpha=1.0, ...\n")
    assert evaluate.infer_method("tiny-sharedclip", ckpt) == "AlignCLIP-IMSep"


def test_exported_folder_loads_in_plain_open_clip_with_the_same_features(tmp_path, tiny_checkpoint):
    import open_clip
    from pretraining import sharedclip
    from pretraining.export import export_open_clip_dir
    folder = export_open_clip_dir("tiny-sharedclip", tiny_checkpoint, tmp_path / "exported")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json",
                                                        "open_clip_model.safetensors"]
    assert json.loads((folder / "open_clip_config.json").read_text())["clipbench"]["shared"]
    plain, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tied = sharedclip.create_model_and_transforms("tiny-sharedclip", str(tiny_checkpoint))[0]
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a red square"])
    image = preprocess(square(COLOURS["red"], 0))[None]
    plain.eval(), tied.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_text(tokens), tied.encode_text(tokens))
        torch.testing.assert_close(plain.encode_image(image), tied.encode_image(image))


def _one_line_error(capsys, code, *parts):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for part in parts:
        assert part in err, err


def test_bad_input_is_one_line_and_writes_no_record(tmp_path, tiny_checkpoint, capsys):
    d = small_data(tmp_path / "data")
    out = tmp_path / "out"
    base = ["--model", "tiny-sharedclip", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--quiet"]
    _one_line_error(capsys, evaluate.main(base + ["--zeroshot", f"folder:{tmp_path}/nope"]),
                    f"{tmp_path}/nope: no such folder")
    (tmp_path / "wrong.json").write_text(json.dumps({"images": []}))
    _one_line_error(capsys, evaluate.main(base + ["--retrieval", f"coco:{tmp_path}/wrong.json,"
                                                  f"images={d['test']}"]),
                    "wrong.json: not COCO captions")
    _one_line_error(capsys, evaluate.main(base + ["--retrieval", f"karpathy:{d['karpathy']}"]),
                    "needs images=DIR")
    _one_line_error(capsys, evaluate.main(base + ["--zeroshot", f"imagenet:{d['test']}"]),
                    "unknown type 'imagenet'")
    _one_line_error(capsys, evaluate.main(["--model", "no-such-model", "--checkpoint",
                                           str(tiny_checkpoint), "--out", str(out),
                                           "--zeroshot", f"folder:{d['test']}"]),
                    "unknown model 'no-such-model'")
    _one_line_error(capsys, evaluate.main(["--model", "tiny-sharedclip", "--checkpoint",
                                           str(tmp_path / "none.pt"), "--out", str(out),
                                           "--zeroshot", f"folder:{d['test']}"]),
                    "none.pt: no such checkpoint file")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _one_line_error(capsys, evaluate.main(["--model", "tiny-clip-w64", "--checkpoint",
                                           str(tmp_path / "junk.pt"), "--out", str(out),
                                           "--zeroshot", f"folder:{d['test']}"]),
                    "junk.pt: cannot load as tiny-clip-w64")
    _one_line_error(capsys, evaluate.main(base + ["--zeroshot", f"world:{tmp_path}"]),
                    "WORLD_DONE.json: no such file")
    assert not out.exists()
