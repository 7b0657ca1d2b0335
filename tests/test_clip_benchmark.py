"""CLIP_benchmark (pip install clip-benchmark) evaluates a harness checkpoint without the
harness: a tiny SharedCLIP state dict is exported as an open_clip `local-dir:` folder
(pretraining/export.py) and CLIP_benchmark's CLI, in a fresh process, runs zero-shot
classification on an image folder (its `imagenet1k-unverified` reader with our class names
and template) and retrieval on COCO-format captions (its `mscoco_captions` reader); its
numbers equal pretraining.evaluate's on the same files.

CLIP_benchmark 1.6.2 (the newest release) fails in zero-shot classification under NumPy
>= 2.4: its metrics/zeroshot_classification.py `accuracy` calls float() on a 1-element
array ("only 0-dimensional arrays can be converted to Python scalars"). That run replaces
just that function by the same computation with .item(); retrieval runs unpatched."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from pretraining import evaluate
from pretraining.export import export_open_clip_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("clip_benchmark") is None,
                                reason="not installed: pip install clip-benchmark")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("square", "circle")


def draw(rgb, shape, k):
    im = Image.new("RGB", (64, 64), (240, 240, 240))
    box = (8 + 3 * k, 8 + 2 * k, 44 + 3 * k, 44 + 2 * k)
    (ImageDraw.Draw(im).rectangle if shape == "square" else ImageDraw.Draw(im).ellipse)(box, fill=rgb)
    return im


# CLIP_benchmark's CLI with its top-k accuracy made NumPy 2.4-safe (see the docstring)
PATCHED_CLI = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zc
from clip_benchmark import cli

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

zc.accuracy = accuracy
sys.exit(cli.main())
"""


def clip_benchmark_eval(args, cwd, patch_accuracy=False):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    entry = ["-c", PATCHED_CLI] if patch_accuracy else ["-m", "clip_benchmark.cli"]
    result = subprocess.run([sys.executable, *entry, "eval", *args,
                             "--no_amp", "--num_workers", "0", "--batch_size", "8", "--quiet"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_clip_benchmark_runs_on_an_exported_harness_checkpoint(tmp_path):
    from pretraining import sharedclip
    torch.manual_seed(1)
    model = sharedclip.create_model_and_transforms("tiny-sharedclip")[0]
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    exported = export_open_clip_dir("tiny-sharedclip", tmp_path / "tiny.pt", tmp_path / "exported")

    # zero-shot: <root>/val/<class>/*.png (CLIP_benchmark's imagenet1k-unverified reads its
    # test split there), class names and template given to CLIP_benchmark
    # CLIP_benchmark's class names are positional: ImageFolder's sorted folder order
    classes = [f.replace("_", " ") for f in sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)]
    for c in COLOURS:
        for s in SHAPES:
            folder = tmp_path / "folder" / "val" / f"{c}_{s}"
            folder.mkdir(parents=True)
            for k in range(3):
                draw(COLOURS[c], s, k).save(folder / f"{k}.png")
    name = "imagenet1k-unverified"
    (tmp_path / "classnames.json").write_text(json.dumps({name: classes}))
    (tmp_path / "templates.json").write_text(json.dumps({name: ["a photo of a {c}."]}))
    clip_benchmark_eval(["--model", f"local-dir:{exported}", "--pretrained", "none",
                         "--dataset", name, "--dataset_root", str(tmp_path / "folder"),
                         "--task", "zeroshot_classification", "--split", "test",
                         "--custom_classname_file", str(tmp_path / "classnames.json"),
                         "--custom_template_file", str(tmp_path / "templates.json"),
                         "--output", str(tmp_path / "zs.json")], tmp_path, patch_accuracy=True)
    theirs = json.loads((tmp_path / "zs.json").read_text())["metrics"]

    # retrieval: COCO-format captions over <root>/val2014 (two captions per image)
    images, anns = [], []
    for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        images.append({"id": i, "file_name": f"{c}_{s}/0.png"})
        anns += [{"id": 2 * i, "image_id": i, "caption": f"a {c} {s}"},
                 {"id": 2 * i + 1, "image_id": i, "caption": f"a photo of a {s} in {c}"}]
    os.symlink(tmp_path / "folder" / "val", tmp_path / "folder" / "val2014")
    (tmp_path / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    clip_benchmark_eval(["--model", f"local-dir:{exported}", "--pretrained", "none",
                         "--dataset", "mscoco_captions", "--dataset_root", str(tmp_path / "folder"),
                         "--task", "zeroshot_retrieval", "--split", "val",
                         "--annotation_file", str(tmp_path / "coco.json"), "--recall_k", "1", "5",
                         "--output", str(tmp_path / "rt.json")], tmp_path)
    theirs_rt = json.loads((tmp_path / "rt.json").read_text())["metrics"]

    # the harness's evaluation on the same files and checkpoint gives the same numbers
    (tmp_path / "names.txt").write_text("".join(f"{c}_{s} {c} {s}\n" for c in COLOURS for s in SHAPES))
    out = tmp_path / "ours"
    assert evaluate.main(["--model", "tiny-sharedclip", "--checkpoint", str(tmp_path / "tiny.pt"),
                          "--templates", "a photo of a {}.", "--quiet", "--out", str(out),
                          "--zeroshot", f"folder:{tmp_path / 'folder' / 'val'},classnames="
                                        f"{tmp_path / 'names.txt'},name=shapes",
                          "--retrieval", f"coco:{tmp_path / 'coco.json'},"
                                         f"images={tmp_path / 'folder' / 'val2014'}"]) == 0
    ours = json.loads((out / evaluate.RECORD_NAME).read_text())
    assert ours["zeroshot"]["shapes"]["top1"] == pytest.approx(100 * theirs["acc1"], abs=1e-3)
    assert ours["zeroshot"]["shapes"]["top5"] == pytest.approx(100 * theirs["acc5"], abs=1e-3)
    rt = ours["retrieval"]["coco"]
    for k in (1, 5):  # CLIP_benchmark: image_retrieval = text -> image
        assert rt["text_to_image"][f"R@{k}"] == pytest.approx(
            100 * theirs_rt[f"image_retrieval_recall@{k}"], abs=1e-3)
        assert rt["image_to_text"][f"R@{k}"] == pytest.approx(
            100 * theirs_rt[f"text_retrieval_recall@{k}"], abs=1e-3)
