"""Bad input: one line naming what and where, a non-zero exit, nothing half-written
(issue 16).

CASES is the table: each case builds its bad input under tmp_path, runs one entry point
as `python -m` / `python script.py` would, and the test asserts the exit status, that
the last line of stderr names what is wrong and where (for DomainBed's train.py: the
last line of its output, where its Tee sends the traceback), and that no `done` file,
results file or checkpoint was left. A control case runs the same command on good
input and finishes.

Entry points run in forked children of one server process that imported torch,
open_clip, DomainBed and Dassl once (tests/entry_points.py): each case pays for its own
work, not for an interpreter start (runpy, `__main__`, its own argv, cwd, environment and
output files).
Cases that need no entry point (every torch.load of the harness is weights_only, a
malicious pickle never runs, malformed YAML of the harness's own files) follow the table.
"""
from __future__ import annotations

import ast
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.conftest import REPO, needs_coop, needs_domainbed
from tests.entry_points import EntryPoints

TINY_HP = {"clip_model": "tiny-vit", "clip_pretrained": "", "templates": "photo",
           "batch_size": 2}
CHILD_ENV = {"CLIPBENCH_NUM_WORKERS": "0", "CLIPBENCH_CACHE": "off",
             "CLIPBENCH_TRACEBACK": "", "OMP_NUM_THREADS": "1"}

# --------------------------------------------------------------------------- the runner

@pytest.fixture(scope="module")
def entry_points(tmp_path_factory):
    runner = EntryPoints(tmp_path_factory.mktemp("runs"), env=CHILD_ENV)
    yield runner
    runner.close()


# --------------------------------------------------------------------------- inputs

def png(path: Path, colour=(200, 30, 30), size=16) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def image_folders(root: Path, per_class=4, classes=("circle", "square")) -> Path:
    """<root>/clip_world/<domain>/<class>/<k>.png: CLIPWorld's DomainBed layout, tiny."""
    from clipworld.generate import DOMAINBED_DIRNAME, DOMAINS
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(classes):
            for k in range(per_class):
                png(root / DOMAINBED_DIRNAME / domain / cls / f"{k}.png", (40 * d, 90 * c, 10 * k))
    return root


def tiny_clip_checkpoint(path: Path, model="tiny-vit") -> Path:
    import torch
    from algorithms import backbone
    torch.manual_seed(0)
    torch.save(backbone.load_clip(model, None)[0].state_dict(), path)
    return path


class Evil:
    """Unpickling it would create `marker` (pickle's __reduce__: open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path, wrapped=True) -> Path:
    import torch
    payload = {"w": torch.zeros(2), "evil": Evil(marker)}
    torch.save({"state_dict": payload} if wrapped else payload, path)
    return path


def truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------- the table

@dataclass
class Case:
    """setup(tmp_path) -> (target, argv) or (target, argv, env); then the checks."""
    id: str
    setup: Callable
    names: tuple                           # in the last line (rc=0 controls: in stdout)
    marks: tuple = ()
    rc: Optional[int] = None               # None: any non-zero
    upstream_output: bool = False          # the line is the last of all output
    no_files: tuple = ("done", "results.jsonl", "results.json", "model.pkl")
    marker: bool = False                   # a malicious pickle's marker must not exist


def domainbed_train(data_dir, out, dataset="CLIPWorld", algorithm="ZSCLIP", **hparams):
    return ("domainbed.scripts.train",
            ["--data_dir", data_dir, "--dataset", dataset, "--algorithm", algorithm,
             "--test_envs", "0", "--steps", "1", "--output_dir", out,
             "--hparams", json.dumps({**TINY_HP, **hparams})])


def _world(tmp):
    return image_folders(tmp / "data")


def _image(tmp, name):
    from clipworld.generate import DOMAINBED_DIRNAME
    return tmp / "data" / DOMAINBED_DIRNAME / "sketch" / "square" / name


def case_domainbed_ok(tmp):
    return domainbed_train(_world(tmp), tmp / "out")


def case_corrupt_image(tmp):
    _world(tmp)
    _image(tmp, "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return domainbed_train(tmp / "data", tmp / "out")


def case_zero_byte_image(tmp):
    _world(tmp)
    _image(tmp, "2.png").write_bytes(b"")
    return domainbed_train(tmp / "data", tmp / "out")


def case_not_an_image(tmp):
    _world(tmp)
    _image(tmp, "notes.jpg").write_text("<html>404 not found</html>")
    return domainbed_train(tmp / "data", tmp / "out")


def case_missing_dataset_folder(tmp):
    return domainbed_train(tmp / "no_data", tmp / "out")


def case_missing_domain(tmp):
    import shutil
    from clipworld.generate import DOMAINBED_DIRNAME
    shutil.rmtree(_world(tmp) / DOMAINBED_DIRNAME / "painting")
    return domainbed_train(tmp / "data", tmp / "out")


def case_classes_differ(tmp):
    from clipworld.generate import DOMAINBED_DIRNAME
    png(_world(tmp) / DOMAINBED_DIRNAME / "photo" / "hexagon" / "0.png")
    return domainbed_train(tmp / "data", tmp / "out")


def case_empty_class(tmp):
    from clipworld.generate import DOMAINBED_DIRNAME
    (_world(tmp) / DOMAINBED_DIRNAME / "cartoon" / "triangle").mkdir()
    for domain in ("painting", "photo", "sketch"):
        png(tmp / "data" / DOMAINBED_DIRNAME / domain / "triangle" / "0.png")
    return domainbed_train(tmp / "data", tmp / "out")


def case_small_split(tmp):
    return domainbed_train(_world(tmp), tmp / "out", batch_size=32)


def case_unknown_dataset(tmp):
    return domainbed_train(_world(tmp), tmp / "out", dataset="CLIPWorlds")


def case_unknown_algorithm(tmp):
    return domainbed_train(_world(tmp), tmp / "out", algorithm="ZSCLIPP")


def case_unknown_clip_model(tmp):
    return domainbed_train(_world(tmp), tmp / "out", clip_model="tiny-vitt")


def case_missing_checkpoint(tmp):
    return domainbed_train(_world(tmp), tmp / "out", clip_pretrained=str(tmp / "nope.pt"))


def case_wrong_model_checkpoint(tmp):
    ckpt = tiny_clip_checkpoint(tmp / "rn.pt", "tiny-rn")
    return domainbed_train(_world(tmp), tmp / "out", clip_pretrained=str(ckpt))


def case_truncated_checkpoint(tmp):
    ckpt = truncated(tmp / "half.pt", tiny_clip_checkpoint(tmp / "vit.pt"))
    return domainbed_train(_world(tmp), tmp / "out", clip_pretrained=str(ckpt))


def case_malicious_checkpoint(tmp):
    ckpt = malicious_checkpoint(tmp / "evil.pt", tmp / "MARKER")
    return domainbed_train(_world(tmp), tmp / "out", clip_pretrained=str(ckpt))


def case_sweep_unknown_dataset(tmp):
    return ("domainbed.scripts.sweep",
            ["launch", "--datasets", "CLIPWorlds", "--algorithms", "ZSCLIP", "--data_dir",
             _world(tmp), "--output_dir", tmp / "out", "--command_launcher", "dummy",
             "--skip_confirmation"])


# --- Dassl / CoOp through train_coop.py (the generated world's Dassl layout, tiny)

DATASET_CFG = REPO / "trainers" / "configs" / "datasets" / "clip_world.yaml"
TINY_CFG = REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml"


def dassl_world(root: Path, per=2, classes=("circle", "square", "star")) -> Path:
    """<root>/clip_world/{images/<domain>/*.png, split_clip_world.json}."""
    from clipworld.generate import DOMAINS
    split = {"train": [], "val": [], "test": []}
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(classes):
            for key in split:
                for k in range(per):
                    rel = f"{domain}/{cls}_{key}{k}.png"
                    png(root / "clip_world" / "images" / rel, (60 * d, 80 * c, 30 * k))
                    split[key].append([rel, c, cls, domain])
    (root / "clip_world" / "split_clip_world.json").write_text(json.dumps(split))
    return root


def split_file(tmp) -> Path:
    return tmp / "coop" / "clip_world" / "split_clip_world.json"


def train_coop(tmp, *extra, trainer="ZSCLIP", config=TINY_CFG):
    return (REPO / "train_coop.py",
            ["--trainer", trainer, "--root", tmp / "coop", "--dataset-config-file", DATASET_CFG,
             "--config-file", config, "--output-dir", tmp / "out", "--seed", "1", *extra])


def eval_checkpoint(tmp, write):
    """CLIPFT evaluated from <tmp>/model_dir/model/model.pth.tar-1, written by write(path)."""
    dassl_world(tmp / "coop")
    path = tmp / "model_dir" / "model" / "model.pth.tar-1"
    path.parent.mkdir(parents=True)
    write(path)
    return train_coop(tmp, "--eval-only", "--model-dir", tmp / "model_dir", "--load-epoch", "1",
                      trainer="CLIPFT")


def case_coop_ok(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only")


def case_coop_corrupt_image(tmp):
    dassl_world(tmp / "coop")
    (tmp / "coop" / "clip_world" / "images" / "sketch" / "star_test1.png").write_bytes(b"GIF89a")
    return train_coop(tmp, "--eval-only")


def case_coop_split_not_json(tmp):
    dassl_world(tmp / "coop")
    text = split_file(tmp).read_text()
    split_file(tmp).write_text(text[: len(text) // 2])
    return train_coop(tmp, "--eval-only")


def case_coop_split_bad_row(tmp):
    dassl_world(tmp / "coop")
    split = json.loads(split_file(tmp).read_text())
    split["val"][3] = ["photo/circle_val1.png", "zero", "circle"]
    split_file(tmp).write_text(json.dumps(split))
    return train_coop(tmp, "--eval-only")


def case_coop_empty_class(tmp):
    dassl_world(tmp / "coop")
    split = json.loads(split_file(tmp).read_text())
    split["train"] = [row for row in split["train"] if row[2] != "square"]
    split_file(tmp).write_text(json.dumps(split))
    return train_coop(tmp, "--eval-only")


def case_coop_malformed_yaml(tmp):
    dassl_world(tmp / "coop")
    bad = tmp / "my_config.yaml"
    bad.write_text(TINY_CFG.read_text().replace("  TRAIN_X:\n", "  TRAIN_X: [\n", 1))
    return train_coop(tmp, "--eval-only", config=bad)


def case_coop_unknown_config_key(tmp):
    dassl_world(tmp / "coop")
    typo = tmp / "my_config.yaml"
    typo.write_text(TINY_CFG.read_text().replace("BATCH_SIZE: 8", "BATCH_SIZ: 8", 1))
    return train_coop(tmp, "--eval-only", config=typo)


def case_coop_image_size(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only", "INPUT.SIZE", "(224, 224)")


def case_coop_unknown_trainer(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only", trainer="ZSCLIPP")


def case_coop_unknown_dataset(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only", "DATASET.NAME", "CLIPWorlds")


def case_coop_unknown_domain(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only", "DATASET.TARGET_DOMAINS", "['paintng']")


def case_coop_unknown_clip_model(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only", "CLIP.MODEL", "tiny-vitt")


def case_coop_missing_checkpoint(tmp):
    dassl_world(tmp / "coop")
    return train_coop(tmp, "--eval-only", "--model-dir", tmp / "model_dir", "--load-epoch", "1",
                      trainer="CLIPFT")


def case_coop_truncated_checkpoint(tmp):
    import torch
    return eval_checkpoint(tmp, lambda p: (torch.save({"state_dict": {"w": torch.zeros(500)},
                                                       "epoch": 1}, p), truncated(p, p)))


def case_coop_wrong_checkpoint(tmp):
    import torch
    return eval_checkpoint(tmp, lambda p: torch.save({"state_dict": {"w": torch.zeros(5)},
                                                      "epoch": 1}, p))


def case_coop_malicious_checkpoint(tmp):
    return eval_checkpoint(tmp, lambda p: malicious_checkpoint(p, tmp / "MARKER"))


# --- the harness's own entry points

def evaluate(tmp, *specs, checkpoint=None):
    ckpt = checkpoint or tiny_clip_checkpoint(tmp / "clip.pt", "tiny-clip-w64")
    return ("pretraining.evaluate", ["--model", "tiny-clip-w64", "--checkpoint", ckpt,
                                     "--out", tmp / "out", "--quiet", *specs])


def class_folders(root: Path) -> Path:
    for c, cls in enumerate(("circle", "square")):
        for k in range(2):
            png(root / cls / f"{k}.png", (90 * c, 40 * k, 0), 32)
    return root


def case_demo_unknown_algorithm(tmp):
    return "sweeps.demo", ["--algorithms", "ZSCLIPP", "--root", tmp / "world",
                           "--output", tmp / "out"]


def case_protocols_unknown_protocol(tmp):
    return "sweeps.coop_protocols", ["base2novel", "--trainer", "ZSCLIP", "--root", tmp]


def case_protocols_unknown_trainer(tmp):
    return "sweeps.coop_protocols", ["base2new", "--trainer", "ZSCLIPP", "--root", tmp,
                                     "--output", tmp / "out"]


def case_protocols_unknown_dataset(tmp):
    return "sweeps.coop_protocols", ["base2new", "--trainer", "ZSCLIP", "--root", tmp,
                                     "--datasets", "oxford_pet", "--output", tmp / "out"]


def case_collect_missing_folder(tmp):
    return "results.collect", [tmp / "no_sweep"]


def case_domain_gap_truncated_model(tmp):
    job = tmp / "sweep" / "job"
    job.mkdir(parents=True)
    (job / "done").write_text("done")
    (job / "results.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    truncated(job / "model.pkl", tiny_clip_checkpoint(tmp / "clip.pt"))
    return "evaluation.domain_gap", [tmp / "sweep", "--images-per-domain", "2"]


def case_evaluate_corrupt_image(tmp):
    folder = class_folders(tmp / "images")
    (folder / "square" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return evaluate(tmp, "--zeroshot", f"folder:{folder}")


def case_evaluate_malicious_checkpoint(tmp):
    ckpt = malicious_checkpoint(tmp / "evil.pt", tmp / "MARKER")
    return evaluate(tmp, "--zeroshot", f"folder:{class_folders(tmp / 'images')}", checkpoint=ckpt)


def case_evaluate_wrong_model_checkpoint(tmp):
    ckpt = tiny_clip_checkpoint(tmp / "vit.pt", "tiny-vit")
    return evaluate(tmp, "--zeroshot", f"folder:{class_folders(tmp / 'images')}", checkpoint=ckpt)


def case_evaluate_truncated_captions(tmp):
    captions = tmp / "captions.json"
    captions.write_text(json.dumps({"images": [{"id": 1, "file_name": "0.png"}],
                                    "annotations": [{"image_id": 1, "caption": "a"}]})[:40])
    return evaluate(tmp, "--retrieval", f"coco:{captions},images={class_folders(tmp / 'img')}")


def case_evaluate_caption_csv(tmp):
    pairs = tmp / "pairs.csv"
    pairs.write_text("filepath\tcaption\n" + f"{png(tmp / 'a.png')}\ta red square\n")
    return evaluate(tmp, "--retrieval", f"pairs:{pairs}")


def malicious_cifar(root: Path, marker: Path) -> Path:
    """torchvision's CIFAR-10 layout whose test batch carries pickled code."""
    import numpy as np
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1],
                     "evil": Evil(marker)}, f)
    return root


def case_evaluate_malicious_cifar(tmp):
    return evaluate(tmp, "--zeroshot", f"cifar10:{malicious_cifar(tmp / 'cifar', tmp / 'MARKER')}")


def case_export_wrong_model_checkpoint(tmp):
    ckpt = tiny_clip_checkpoint(tmp / "rn.pt", "tiny-rn")
    return "pretraining.export", ["--model", "tiny-vit", "--checkpoint", ckpt, "--out", tmp / "out"]


def case_benchmark_malicious_scores(tmp):
    scores = malicious_checkpoint(tmp / "scores.pt", tmp / "MARKER", wrapped=False)
    return REPO / "benchmarks" / "calip_grid_search.py", ["--scores", scores]


def case_unexpected_error_is_one_line(tmp):
    """An error no check of the harness expects: one line from common/cli.py, no traceback."""
    (tmp / "a_file").write_text("")
    return "clipworld.generate", ["--root", tmp / "a_file" / "world"]


HARNESS = [
    Case("demo: unknown algorithm", case_demo_unknown_algorithm,
         ("invalid choice: 'ZSCLIPP'", "ZSCLIP", "AlignCLIP"), rc=2),
    Case("coop_protocols: unknown protocol", case_protocols_unknown_protocol,
         ("invalid choice: 'base2novel'", "base2new", "cross_dataset"), rc=2),
    Case("coop_protocols: unknown trainer", case_protocols_unknown_trainer,
         ("coop_protocols: error: ZSCLIPP", "known:", "CoCoOp", "ZSCLIP"), (needs_coop,),
         rc=2),
    Case("coop_protocols: unknown dataset", case_protocols_unknown_dataset,
         ("coop_protocols: error: unknown dataset 'oxford_pet'", "oxford_pets"), (needs_coop,),
         rc=2),
    Case("collect: missing folder", case_collect_missing_folder,
         ("results.collect: error:", "no_sweep: no such folder"), rc=2),
    Case("domain_gap: truncated model.pkl", case_domain_gap_truncated_model,
         ("domain_gap: error:", "job/model.pkl", "truncated or not a torch checkpoint"),
         (needs_domainbed,), no_files=("domain_gap.json", "domain_gap_tsne.png")),
    Case("evaluate: corrupt image", case_evaluate_corrupt_image,
         ("error: ", "square/1.png: cannot read image"), rc=2,
         no_files=("pretraining_eval.json",)),
    Case("evaluate: checkpoint with pickled code", case_evaluate_malicious_checkpoint,
         ("error: ", "evil.pt: cannot load as tiny-clip-w64", "refused"), rc=2, marker=True,
         no_files=("pretraining_eval.json",)),
    Case("evaluate: checkpoint of another model", case_evaluate_wrong_model_checkpoint,
         ("error: ", "vit.pt: cannot load as tiny-clip-w64", "not a tiny-clip-w64 checkpoint"),
         rc=2, no_files=("pretraining_eval.json",)),
    Case("evaluate: truncated caption file", case_evaluate_truncated_captions,
         ("error: ", "captions.json: not JSON"), rc=2, no_files=("pretraining_eval.json",)),
    Case("evaluate: caption file without its column", case_evaluate_caption_csv,
         ("error: ", "pairs.csv: no column 'title'"), rc=2, no_files=("pretraining_eval.json",)),
    Case("evaluate: CIFAR batch with pickled code", case_evaluate_malicious_cifar,
         ("error: ", "test_batch: refused", "GLOBAL"), rc=2, marker=True,
         no_files=("pretraining_eval.json",)),
    Case("export: checkpoint of another model", case_export_wrong_model_checkpoint,
         ("error: ", "rn.pt: cannot load as tiny-vit", "not a tiny-vit checkpoint"), rc=2,
         no_files=("open_clip_config.json", "open_clip_model.safetensors")),
    Case("benchmark: score file with pickled code", case_benchmark_malicious_scores,
         ("error: ", "scores.pt (CALIP score file): refused"), marker=True),
    Case("generate: an unexpected failure is one line", case_unexpected_error_is_one_line,
         ("error: NotADirectoryError", "a_file/world", "CLIPBENCH_TRACEBACK=1"), rc=1,
         no_files=("WORLD_DONE.json",)),
]

def oxford_pets(root: Path) -> Path:
    """CoOp's OxfordPets layout, tiny: images/ and split_zhou_OxfordPets.json."""
    split = {key: [[png(root / "oxford_pets" / "images" / f"{cls}_{key}{k}.png").name, c, cls]
                   for c, cls in enumerate(("abyssinian", "beagle")) for k in range(2)]
             for key in ("train", "val", "test")}
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def coop_pets(tmp, *extra):
    target, argv = train_coop(tmp, "--eval-only", *extra)
    argv[argv.index("--dataset-config-file") + 1] = (REPO / "third_party" / "CoOp" / "configs" /
                                                     "datasets" / "oxford_pets.yaml")
    return target, argv


def case_coop_pets_split_not_json(tmp):
    oxford_pets(tmp / "coop")
    (tmp / "coop" / "oxford_pets" / "split_zhou_OxfordPets.json").write_text('{"train": [["a')
    return coop_pets(tmp)


def case_coop_fewshot_cache_ok(tmp):
    from dassl.data.datasets import Datum
    root = oxford_pets(tmp / "coop") / "oxford_pets"
    split = json.loads((root / "split_zhou_OxfordPets.json").read_text())
    cache = root / "split_fewshot" / "shot_2-seed_1.pkl"
    cache.parent.mkdir()
    cache.write_bytes(pickle.dumps(
        {key: [Datum(impath=str(root / "images" / f), label=y, classname=c)
               for f, y, c in split[key]] for key in ("train", "val")},
        protocol=pickle.HIGHEST_PROTOCOL))  # as CoOp writes it
    return coop_pets(tmp, "DATASET.NUM_SHOTS", "2")


def case_coop_fewshot_cache_with_code(tmp):
    cache = oxford_pets(tmp / "coop") / "oxford_pets" / "split_fewshot" / "shot_2-seed_1.pkl"
    cache.parent.mkdir()
    cache.write_bytes(pickle.dumps({"train": Evil(tmp / "MARKER"), "val": []}))
    return coop_pets(tmp, "DATASET.NUM_SHOTS", "2")


COOP = (needs_coop,)
COOP_ERROR = "train_coop.py: error: "
DB = (needs_domainbed,)
CASES = [
    Case("domainbed: good input finishes", case_domainbed_ok, (), DB, rc=0, no_files=()),
    Case("domainbed: corrupt image", case_corrupt_image,
         ("cannot read image", "sketch/square/1.png"), DB, upstream_output=True),
    Case("domainbed: zero-byte image", case_zero_byte_image,
         ("cannot read image", "sketch/square/2.png"), DB, upstream_output=True),
    Case("domainbed: not an image", case_not_an_image,
         ("cannot read image", "sketch/square/notes.jpg"), DB, upstream_output=True),
    Case("domainbed: missing dataset folder", case_missing_dataset_folder,
         ("DomainBed dataset folder not found", "no_data/clip_world"), DB, upstream_output=True),
    Case("domainbed: missing domain folder", case_missing_domain,
         ("missing domain folder", "clip_world/painting"), DB, upstream_output=True),
    Case("domainbed: class folders differ", case_classes_differ,
         ("different class folders", "only in photo: hexagon", "clip_world"), DB,
         upstream_output=True),
    Case("domainbed: empty class", case_empty_class,
         ("cartoon/triangle", "no image in this class folder"), DB, upstream_output=True),
    Case("domainbed: training split < batch", case_small_split,
         ("fewer than batch_size=32", "clip_world/"), DB, upstream_output=True),
    Case("domainbed: unknown dataset", case_unknown_dataset,
         ("unknown DomainBed dataset 'CLIPWorlds'", "CLIPWorld", "PACS"), DB,
         upstream_output=True),
    Case("domainbed: unknown algorithm", case_unknown_algorithm,
         ("unknown DomainBed algorithm 'ZSCLIPP'", "ZSCLIP", "ERM"), DB, upstream_output=True),
    Case("domainbed: unknown CLIP model", case_unknown_clip_model,
         ("unknown CLIP model 'tiny-vitt'", "tiny-vit", "ViT-B-16"), DB, upstream_output=True),
    Case("domainbed: missing checkpoint", case_missing_checkpoint,
         ("CLIP checkpoint not found", "nope.pt"), DB, upstream_output=True),
    Case("domainbed: checkpoint of another model", case_wrong_model_checkpoint,
         ("rn.pt", "not a tiny-vit checkpoint", "missing keys"), DB, upstream_output=True),
    Case("domainbed: truncated checkpoint", case_truncated_checkpoint,
         ("half.pt", "truncated or not a torch checkpoint"), DB, upstream_output=True),
    Case("domainbed: checkpoint with pickled code", case_malicious_checkpoint,
         ("evil.pt", "refused", "weights_only=True"), DB, upstream_output=True, marker=True),
    Case("domainbed sweep: unknown dataset", case_sweep_unknown_dataset,
         ("unknown DomainBed dataset 'CLIPWorlds'",), DB, upstream_output=True),
    Case("coop: good input finishes", case_coop_ok, (), COOP, rc=0, no_files=()),
    Case("coop: corrupt image", case_coop_corrupt_image,
         (COOP_ERROR, "cannot read image", "images/sketch/star_test1.png"), COOP),
    Case("coop: split file not JSON", case_coop_split_not_json,
         (COOP_ERROR, "split_clip_world.json is not JSON"), COOP),
    Case("coop: split file row", case_coop_split_bad_row,
         (COOP_ERROR, "split_clip_world.json: val[3]", "expected [image path, label"), COOP),
    Case("coop: empty class", case_coop_empty_class,
         (COOP_ERROR, "CLIPWorld: 2 class names for 3 classes", "label(s) [1]"), COOP),
    Case("coop: CoOp's split file not JSON", case_coop_pets_split_not_json,
         (COOP_ERROR, "oxford_pets/split_zhou_OxfordPets.json: malformed JSON"), COOP),
    Case("coop: CoOp's own few-shot cache still loads", case_coop_fewshot_cache_ok,
         ("Loading preprocessed few-shot data",), COOP, rc=0, no_files=()),
    Case("coop: few-shot cache with pickled code", case_coop_fewshot_cache_with_code,
         (COOP_ERROR, "split_fewshot/shot_2-seed_1.pkl: refused", "GLOBAL io.open"), COOP,
         marker=True),
    Case("coop: malformed --config-file", case_coop_malformed_yaml,
         (COOP_ERROR, "my_config.yaml: malformed YAML", "line 6, column 7"), COOP),
    Case("coop: unknown key in --config-file", case_coop_unknown_config_key,
         (COOP_ERROR, "my_config.yaml: Non-existent config key: DATALOADER.TRAIN_X.BATCH_SIZ"),
         COOP),
    Case("coop: image size does not fit the model", case_coop_image_size,
         (COOP_ERROR, "INPUT.SIZE (224, 224)", "tiny-vit's image size 64"), COOP),
    Case("coop: unknown trainer", case_coop_unknown_trainer,
         (COOP_ERROR, "ZSCLIPP", "ZSCLIP", "CoOp"), COOP),
    Case("coop: unknown dataset", case_coop_unknown_dataset,
         (COOP_ERROR, "CLIPWorlds", "OxfordPets"), COOP),
    Case("coop: unknown domain", case_coop_unknown_domain,
         (COOP_ERROR, "paintng", "painting"), COOP),
    Case("coop: unknown CLIP model", case_coop_unknown_clip_model,
         (COOP_ERROR, "unknown CLIP model 'tiny-vitt'", "tiny-vit,"), COOP),
    Case("coop: missing checkpoint", case_coop_missing_checkpoint,
         (COOP_ERROR, "no checkpoint at", "model_dir/model/model.pth.tar-1"), COOP),
    Case("coop: truncated checkpoint", case_coop_truncated_checkpoint,
         (COOP_ERROR, "model.pth.tar-1", "truncated or not a torch checkpoint"), COOP),
    Case("coop: checkpoint of another model", case_coop_wrong_checkpoint,
         (COOP_ERROR, "model.pth.tar-1", "not a CLIPFT checkpoint", "unexpected keys"), COOP),
    Case("coop: checkpoint with pickled code", case_coop_malicious_checkpoint,
         (COOP_ERROR, "model.pth.tar-1", "refused"), COOP, marker=True),
] + HARNESS


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, entry_points, tmp_path):
    target, argv, *env = case.setup(tmp_path)
    result = entry_points.run(target, argv, env=env[0] if env else None)
    shown = f"rc={result.rc}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    if case.rc == 0:  # a control: good input finishes (and shows what it should)
        assert result.rc == 0, shown
        assert all(part in result.stdout for part in case.names), shown
        return
    assert result.rc != 0 and (case.rc is None or result.rc == case.rc), shown
    line = result.last_output_line if case.upstream_output else result.last_error_line
    for part in case.names:
        assert part in line, f"{part!r} not in the last line {line!r}\n{shown}"
    if not case.upstream_output:
        assert "Traceback" not in result.stderr, shown
    left = [p for name in case.no_files for p in tmp_path.rglob(name)]
    assert not left, f"half-written: {left}"
    assert not list((tmp_path / "out").rglob("*.pth.tar*")), "a checkpoint was written"
    if case.marker:
        assert not (tmp_path / "MARKER").exists(), "the pickled code ran"


# --------------------------------------------------------------------------- no entry point

HARNESS_SOURCES = [p for d in ("algorithms", "clipworld", "common", "domainbed_adapter",
                               "pretraining", "results", "sweeps", "trainers", "benchmarks")
                   for p in sorted((REPO / d).rglob("*.py"))] + [REPO / "train_coop.py"]


def _calls(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_load_of_the_harness_refuses_pickled_code():
    """torch.load always with weights_only=True; no pickle.load / np.load(allow_pickle=True)
    (CIFAR's batches: common/readers.py's arrays-only unpickler)."""
    bad = []
    for path in HARNESS_SOURCES:
        for call, name in _calls(path):
            kwargs = {k.arg: k.value for k in call.keywords}
            where = f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)[:80]}"
            if name in ("torch.load", "torch.serialization.load"):
                value = kwargs.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(where)
            elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load",
                          "joblib.load", "torch.jit.load", "dill.load"):
                bad.append(where)
            elif name in ("np.load", "numpy.load") and "allow_pickle" in kwargs:
                bad.append(where)
            elif name.endswith(("create_model", "create_model_and_transforms",
                                "load_checkpoint", "load_state_dict")) and \
                    isinstance(kwargs.get("weights_only"), ast.Constant) and \
                    kwargs["weights_only"].value is False:
                bad.append(where)
    assert not bad, "loads that could run pickled code:\n" + "\n".join(bad)


def test_every_entry_point_fails_through_common_cli():
    """Each `if __name__ == "__main__":` of the harness is `cli.run(main...)`."""
    bad = []
    for path in HARNESS_SOURCES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
                body = [ast.unparse(n) for n in node.body]
                if len(body) != 1 or not body[0].startswith("cli.run(main"):
                    bad.append(f"{path.relative_to(REPO)}: {body}")
    assert not bad, bad


@pytest.fixture
def evil(tmp_path):
    """(a torch checkpoint whose pickle would create `marker`, marker): the pickle does
    run under a plain loader, so the files below are really malicious."""
    import torch
    marker = tmp_path / "MARKER"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()
    marker.unlink()
    return path, marker


def _load_checkpoint(path, tmp_path):
    from algorithms import backbone
    backbone.load_checkpoint(path)


def _load_clip(path, tmp_path):
    from algorithms import backbone
    backbone.load_clip("tiny-vit", str(path))


def _comalign_head(path, tmp_path):
    from algorithms.comalign.head import load_head_checkpoint
    load_head_checkpoint(str(path))


def _feature_cache(path, tmp_path):
    """A cache entry that cannot be loaded is recomputed (a warning), never unpickled."""
    import warnings
    from algorithms.core.feature_cache import FeatureCache
    cache = FeatureCache(tmp_path / "cache", "scores")
    key = {"clip_model": "tiny-vit", "data": {"dataset": "x"}}
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(path.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load(key) is None
    raise ValueError(f"{path}: refused " + " ".join(str(w.message) for w in caught))


LOADERS = {"backbone.load_checkpoint": _load_checkpoint, "backbone.load_clip": _load_clip,
           "ComAlign head": _comalign_head, "feature cache": _feature_cache}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_malicious_pickle_never_runs(loader, evil, tmp_path):
    path, marker = evil
    with pytest.raises((ValueError, RuntimeError)) as raised:
        LOADERS[loader](path, tmp_path)
    assert not marker.exists(), f"{loader} ran the pickled code"
    assert "evil.pt" in str(raised.value) and "refused" in str(raised.value), raised.value


def test_a_malicious_cifar_batch_never_runs(tmp_path):
    from common import readers as ds
    root = malicious_cifar(tmp_path / "cifar", tmp_path / "MARKER")
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        pickle.load(f)  # what torchvision's reader would do: the code runs
    assert (tmp_path / "MARKER").exists()
    (tmp_path / "MARKER").unlink()
    with pytest.raises(ds.DataError, match="test_batch: refused"):
        ds.cifar("cifar10", root, train=False)
    assert not (tmp_path / "MARKER").exists()


def test_malformed_yaml_of_the_harness_names_file_and_line(tmp_path):
    from common import cli
    bad = tmp_path / "protocols.yaml"
    bad.write_text("trainers:\n  CoOp:\n    config: [a, b\n")
    with pytest.raises(cli.InputError, match=r"protocols.yaml: malformed YAML .*line \d+"):
        cli.read_yaml_mapping(bad, "protocol settings")
    from sweeps import coop_protocols
    with pytest.raises(cli.InputError, match="protocols.yaml: malformed YAML"):
        coop_protocols.load_settings("CoOp", path=bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(cli.InputError, match="list.yaml: expected a mapping"):
        coop_protocols.read_config(listed)
    with pytest.raises(cli.InputError, match="nope.yaml: no such file"):
        cli.read_yaml(tmp_path / "nope.yaml")
    for shipped in sorted((REPO / "trainers" / "configs").rglob("*.yaml")):
        cli.read_yaml_mapping(shipped)  # every shipped config parses


@needs_coop
def test_malformed_recipe_book_names_the_file_and_entry(tmp_path):
    import recipes
    from common import cli
    bad = tmp_path / "recipes.yaml"
    bad.write_text("entries:\n  - methods: [CLIPood\n")
    with pytest.raises(cli.InputError, match="recipes.yaml: malformed YAML"):
        recipes.read_book(bad)
    bad.write_text("entries:\n  - {methods: [CLIPood], harness: dassl, values: {bma_beta: 0.1}}\n")
    with pytest.raises(ValueError, match=r"recipes.yaml: entry 1: no source"):
        recipes.read_book(bad)
    bad.write_text("entries:\n  - {methods: [CLIPood], harness: jax, source: x}\n")
    with pytest.raises(ValueError, match=r"entry 1: harness 'jax' not in"):
        recipes.read_book(bad)


def test_one_line_errors_and_the_traceback_switch(capsys, monkeypatch):
    from common import cli

    def broken(argv):
        raise KeyError("unknown thing 'x'; known: a, b")

    monkeypatch.delenv("CLIPBENCH_TRACEBACK", raising=False)
    assert cli.guarded(broken, []) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: KeyError: unknown thing 'x'; known: a, b "
                   "(CLIPBENCH_TRACEBACK=1 shows the traceback)")
    monkeypatch.setenv("CLIPBENCH_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli.guarded(broken, [])
    monkeypatch.delenv("CLIPBENCH_TRACEBACK")
    assert cli.guarded(lambda argv: 3, []) == 3 and cli.guarded(lambda: None) == 0
    with pytest.raises(SystemExit):  # argparse's usage errors pass through
        cli.guarded(lambda argv: (_ for _ in ()).throw(SystemExit(2)), [])

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.guarded(interrupted, []) == 130
    worker = OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback "
                     "(most recent call last):\n  File \"x.py\", line 1\nOSError: cannot read "
                     "image /d/a.png: empty file (0 bytes)\n")
    assert cli.one_line(worker) == "OSError: cannot read image /d/a.png: empty file (0 bytes)"
    assert cli.one_line(cli.InputError("a.yaml: malformed")) == "a.yaml: malformed"
