"""sweeps/coop_protocols.py: CoOp's base-to-new, cross-dataset and domain-generalization
protocols over train_coop.py, on the generated world in CoOp's layout (OxfordPets), with
one of the harness's trainers (ZSCLIP) and CoOp's own CoOp on a tiny OpenAI-format CLIP
given as a local file."""
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from sweeps import coop_protocols as cp
from tests.conftest import PY, REPO, THIRD_PARTY, needs_coop, run

COOP = THIRD_PARTY / "CoOp"
TINY_BACKBONE = str(REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml")
COOP_TINY = str(REPO / "trainers" / "configs" / "CoOp" / "tiny_vit.yaml")


def protocol(*argv, timeout=600):
    return run([PY, "-m", "sweeps.coop_protocols", *map(str, argv)], timeout=timeout)


@pytest.fixture(scope="module")
def openai_clip_dir(tmp_path_factory):
    """A tiny CLIP built with CoOp's own clip.model.CLIP (ViT, 64 px, patch 8, width 64,
    2 layers; text context 77, vocabulary 49408, width 64, 2 layers), its state dict saved
    under the file name of OpenAI's ViT-B/16 download."""
    import torch
    spec = importlib.util.spec_from_file_location("coop_clip_model", COOP / "clip" / "model.py")
    model_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_py)
    torch.manual_seed(0)
    model = model_py.CLIP(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64,
                          vision_patch_size=8, context_length=77, vocab_size=49408,
                          transformer_width=64, transformer_heads=1, transformer_layers=2)
    folder = tmp_path_factory.mktemp("openai_clip")
    torch.save(model.state_dict(), folder / "ViT-B-16.pt")
    return folder


def records(folder):
    return {p.relative_to(folder).parts: json.loads(p.read_text())
            for p in Path(folder).rglob("results.json")}


# --- without upstream -----------------------------------------------------------------

def test_dataset_table_matches_coop_configs():
    if not (COOP / "datasets").is_dir():
        pytest.skip("CoOp is not in third_party/")
    for key, dataset in cp.DATASETS.items():
        config = dataset.config_file
        assert yaml.safe_load(config.read_text())["DATASET"]["NAME"] == dataset.name, key
        harness = config.is_relative_to(REPO / "trainers")
        source = (REPO / "clipworld" / "dassl_dataset.py" if harness
                  else COOP / "datasets" / f"{key}.py").read_text()
        assert f'dataset_dir = "{dataset.folder}"' in source, key
    assert len(cp.TARGETS["base2new"]) == 11 and len(cp.TARGETS["cross_dataset"]) == 10
    assert cp.dataset_by_name("OxfordPets") is cp.dataset_by_name("oxford_pets")


def test_every_trainer_has_settings_and_its_configs_exist():
    from algorithms.core import registry
    for trainer in [*registry.methods(), *cp.COOP_TRAINERS]:
        settings = cp.load_settings(trainer)
        for path in {settings.config, *settings.config_by_dataset.values()}:
            if "third_party" in str(path) and not COOP.is_dir():
                continue
            assert path.is_file(), (trainer, path)
    assert not cp.load_settings("ZSCLIP").train and cp.load_settings("CoOp").train
    assert cp.load_settings("CALIPFS").train and not cp.load_settings("CALIPOracle").train
    assert cp.load_settings("AlignCLIP").config.name == "vit_b16.yaml"
    with pytest.raises(ValueError, match="not a harness trainer"):
        cp.load_settings("NoSuchTrainer")
    assert cp.load_settings("CoOp").config_for("imagenet").name == "vit_b16_ep50_ctxv1.yaml"
    assert cp.load_settings("CoCoOp").config.name == "vit_b16_c4_ep10_batch1_ctxv1.yaml"


def test_alignclip_epochs_match_the_reference_steps():
    settings = cp.load_settings("AlignCLIP")
    pets = cp.DATASETS["oxford_pets"]
    config = {"DATALOADER": {"TRAIN_X": {"BATCH_SIZE": 36}}}
    counts = {"train_counts": {label: 40 for label in range(37)}}  # OxfordPets: 37 breeds
    opts, note = cp.max_epoch_opts(settings, pets, counts, 16, "base", config, [])
    batches = (16 * 19) // 36  # 19 base classes x 16 shots, full batches of 36
    assert opts == ["OPTIM.MAX_EPOCH", str(math.ceil(500 / batches))]
    assert "500 reference steps" in note
    imagenet = {"classes": 1000}
    opts, _ = cp.max_epoch_opts(settings, cp.DATASETS["imagenet"], imagenet, 16, "all", config, [])
    assert opts == ["OPTIM.MAX_EPOCH", str(math.ceil(5000 / (16000 // 36)))]
    opts, _ = cp.max_epoch_opts(settings, pets, counts, 16, "base", config,
                                ["DATALOADER.TRAIN_X.BATCH_SIZE", "8"])
    assert opts == ["OPTIM.MAX_EPOCH", str(math.ceil(500 / (16 * 19 // 8)))]
    coop = cp.load_settings("CoOp")  # no reference budget: its config's epochs
    assert cp.max_epoch_opts(coop, pets, counts, 16, "base", config, []) == ([], "")
    given = ["OPTIM.MAX_EPOCH", "1"]  # the command line wins
    assert cp.max_epoch_opts(settings, pets, counts, 16, "base", config, given) == ([], "")


def test_missing_and_incomplete_datasets_are_one_line_each(small_world, tmp_path):
    root = Path(small_world["coop_root"])
    assert cp.DATASETS["oxford_pets"].check(root)[0] is None
    problem, _ = cp.DATASETS["caltech101"].check(root)
    assert problem == f"Caltech101: missing caltech-101/ (looked in {root})"
    copy = tmp_path / "data"
    shutil.copytree(root / "oxford_pets", copy / "oxford_pets")
    split = json.loads((copy / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    first = split["test"][0][0]
    (copy / "oxford_pets" / "images" / first).unlink()
    problem, _ = cp.DATASETS["oxford_pets"].check(copy)
    assert re.fullmatch(rf"OxfordPets: missing 1 of \d+ images listed in "
                        rf"split_zhou_OxfordPets.json \(first: images/{first}\) "
                        rf"\(looked in {copy / 'oxford_pets'}\)", problem)
    (copy / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    assert cp.DATASETS["oxford_pets"].check(copy)[0] == \
        f"OxfordPets: missing split_zhou_OxfordPets.json (looked in {copy / 'oxford_pets'})"


# --- with Dassl and CoOp --------------------------------------------------------------

@needs_coop
def test_base_and_new_are_disjoint_and_cover_all_classes(small_world):
    """CoOp's own OxfordPets.subsample_classes on the world's split, as every CoOp
    dataset calls it after few-shot sampling."""
    script = f"""
import json
from trainers import coop_runner
coop_runner.prepare()
from datasets.oxford_pets import OxfordPets
train, val, test = OxfordPets.read_split({small_world['coop_oxford_pets_split']!r},
                                         {small_world['coop_oxford_pets'] + '/images'!r})
names = lambda items: sorted({{i.classname for i in items}})
out = {{"all": names(train + val + test)}}
for sub in ("base", "new"):
    parts = OxfordPets.subsample_classes(train, val, test, subsample=sub)
    out[sub] = [names(p) for p in parts]
    out[sub + "_labels"] = sorted({{i.label for p in parts for i in p}})
print(json.dumps(out))
"""
    result = run([PY, "-c", script])
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    base, new = set(out["base"][0]), set(out["new"][0])
    assert base and new and not base & new and base | new == set(out["all"])
    assert all(set(part) == base for part in out["base"]) and all(set(p) == new for p in out["new"])
    assert len(base) == math.ceil(len(out["all"]) / 2)
    assert out["base_labels"] == list(range(len(base)))
    assert out["new_labels"] == list(range(len(new)))


@needs_coop
def test_base2new_two_trainers_table_and_rerun(small_world, openai_clip_dir, tmp_path):
    out = tmp_path / "output"
    argv = ["base2new", "--trainer", "ZSCLIP", "CoOp", "--config-file", TINY_BACKBONE, COOP_TINY,
            "--root", small_world["coop_root"], "--output", out, "--datasets", "oxford_pets",
            "caltech101", "--seeds", "1", "--openai-clip-dir", openai_clip_dir, "--no-figures"]
    first = protocol(*argv)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the missing dataset: one line saying what and where, the rest runs
    assert [line for line in first.stderr.splitlines() if "Caltech101" in line] == \
        [f"Caltech101: missing caltech-101/ (looked in {small_world['coop_root']})"]
    assert "4 runs: 0 finished (skipped), 4 to run" in first.stdout
    found = records(out / "base2new")
    layout = {("train_base", "oxford_pets", "shots_16", t, c, "seed1", "results.json")
              for t, c in (("ZSCLIP", "tiny_vit"), ("CoOp", "tiny_vit"))}
    assert layout | {("test_new",) + key[1:] for key in layout} == set(found)
    for key, record in found.items():
        assert record["kind"] == "dassl" and record["trainer"] == key[3]
        assert record["subsample_classes"] == {"train_base": "base", "test_new": "new"}[key[0]]
        assert record["num_classes"] == 5 and record["split"] == "test" and record["seed"] == 1
        assert (record["run"]["protocol"], record["run"]["stage"]) == \
            ("base2new", {"train_base": "base", "test_new": "new"}[key[0]])
        assert set(record["metrics"]) >= {"accuracy", "error_rate", "macro_f1"}
    # CoOp trained (a checkpoint per epoch) and its new-class test loaded the last one
    coop_base = out / "base2new" / "train_base" / "oxford_pets" / "shots_16" / "CoOp" / "tiny_vit"
    coop_base = coop_base / "seed1"
    assert (coop_base / "prompt_learner" / "model.pth.tar-1").is_file()
    coop_new = Path(str(coop_base).replace("train_base", "test_new"))
    assert "Loading weights to prompt_learner" in (coop_new / "log.txt").read_text()
    # the table: base, new and their harmonic mean per trainer, published rows marked
    table = (out / "tables" / "base2new" / "dassl_base2new_OxfordPets.md").read_text()
    for trainer in ("ZSCLIP", "CoOp"):
        base = found["train_base", "oxford_pets", "shots_16", trainer, "tiny_vit", "seed1",
                     "results.json"]["metrics"]["accuracy"]
        new = found["test_new", "oxford_pets", "shots_16", trainer, "tiny_vit", "seed1",
                    "results.json"]["metrics"]["accuracy"]
        hm = 2 * base * new / (base + new) if base + new else 0.0
        # rows of runs that differ in backbone or precision are apart, each label says which
        row = f"| {base:.2f} ± 0.00 | {new:.2f} ± 0.00 | {hm:.2f} |"
        assert any(line.startswith(f"| {trainer} (") and line.endswith(row)
                   for line in table.splitlines()), table
    assert "(published, ViT-B/16)" in table and "| HM |" in first.stdout

    # a rerun: nothing is redone
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    again = protocol(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 runs: 4 finished (skipped), 0 to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == mtimes
    # a run without results.json is unfinished: started afresh
    (coop_new / "results.json").unlink()
    (coop_new / "stale.txt").write_text("half a run")
    third = protocol(*argv)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "3 finished (skipped), 1 to run" in third.stdout
    assert "removing an unfinished run" in third.stdout
    assert (coop_new / "results.json").is_file() and not (coop_new / "stale.txt").exists()


@needs_coop
def test_cross_dataset_trains_on_imagenet_and_evaluates_targets(small_world, openai_clip_dir,
                                                                tmp_path):
    """A stand-in ImageNet in CoOp's layout (the world's photos, one folder per class),
    CoOp trained on it and evaluated on OxfordPets with the ImageNet model."""
    pets = Path(small_world["coop_oxford_pets"])
    split = json.loads((pets / "split_zhou_OxfordPets.json").read_text())
    data = tmp_path / "data"
    shutil.copytree(pets, data / "oxford_pets")
    classes = {}
    for part, folder in (("train", "train"), ("test", "val")):
        for path, label, name in split[part]:
            target = data / "imagenet" / "images" / folder / f"n{label:08d}" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(pets / "images" / path, target)
            classes[f"n{label:08d}"] = name
    (data / "imagenet" / "classnames.txt").write_text(
        "".join(f"{wnid} {name}\n" for wnid, name in sorted(classes.items())))
    out = tmp_path / "output"
    result = protocol("cross_dataset", "--trainer", "CoOp", "--config-file", COOP_TINY,
                      "--root", data, "--output", out, "--datasets", "oxford_pets", "--seeds", "1",
                      "--shots", "4", "--openai-clip-dir", openai_clip_dir, "--no-figures")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    source = out / "imagenet" / "CoOp" / "tiny_vit_4shots" / "seed1"
    target = out / "evaluation" / "CoOp" / "tiny_vit_4shots" / "oxford_pets" / "seed1"
    assert json.loads((source / "results.json").read_text())["dataset"] == "ImageNet"
    record = json.loads((target / "results.json").read_text())
    assert record["dataset"] == "OxfordPets" and record["subsample_classes"] == "all"
    assert record["num_classes"] == 10
    assert f'from "{source}' in (target / "log.txt").read_text()  # the ImageNet model
    assert "Cross-dataset transfer" in result.stdout
    assert (out / "tables" / "cross_dataset" / "dassl_xd.csv").is_file()


@needs_coop
def test_nothing_to_run_is_an_error_and_missing_weights_are_named(small_world, tmp_path):
    result = protocol("domain_generalization", "--trainer", "ZSCLIP", "--config-file", TINY_BACKBONE,
                      "--root", small_world["coop_root"], "--output", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    for name, folder in (("ImageNetV2", "imagenetv2"), ("ImageNetSketch", "imagenet-sketch"),
                         ("ImageNetA", "imagenet-adversarial"), ("ImageNetR", "imagenet-rendition"),
                         ("ImageNet", "imagenet")):
        assert f"{name}: missing {folder}/ (looked in {small_world['coop_root']})" in lines
    assert lines[-1] == "coop_protocols: error: nothing can run (see the lines above)"
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "no_weights"
    empty.mkdir()
    result = protocol("base2new", "--trainer", "CoOp", "--config-file", COOP_TINY,
                      "--root", small_world["coop_root"], "--output", tmp_path / "out",
                      "--datasets", "oxford_pets", "--openai-clip-dir", empty)
    assert result.returncode == 2
    assert f"CoOp: missing OpenAI CLIP ViT-B/16 weights (looked for {empty / 'ViT-B-16.pt'})" \
        in result.stderr
    # train_coop.py itself: the file it was pointed at, never a download
    direct = run([PY, "train_coop.py", "--trainer", "CoOp", "--root", small_world["coop_root"],
                  "--dataset-config-file", str(COOP / "configs" / "datasets" / "oxford_pets.yaml"),
                  "--config-file", COOP_TINY, "--output-dir", str(tmp_path / "direct"),
                  "--eval-only"], env={"CLIPBENCH_OPENAI_CLIP_DIR": str(empty)}, timeout=300)
    assert direct.returncode == 1
    assert f"no OpenAI CLIP ViT-B/16 weights at {empty / 'ViT-B-16.pt'}" in direct.stderr
    assert "Traceback" not in direct.stderr
