"""train_coop.py runs CoOp's train.py with the harness's trainers and CoOp's own
dataset classes on the generated world in CoOp's OxfordPets layout."""
import json
import re

from tests.conftest import CLIP_WORLD_CONFIG, PY, REPO, base_then_new, needs_coop, run, train_coop

pytestmark = needs_coop


def test_base_and_new_print_parseable_accuracy(small_world, tmp_path):
    base = train_coop("ZSCLIP", small_world, tmp_path / "base" / "seed1",
                      "DATASET.NUM_SHOTS", "4", "DATASET.SUBSAMPLE_CLASSES", "base")
    assert base.returncode == 0, base.stderr[-3000:]
    new = train_coop("ZSCLIP", small_world, tmp_path / "new" / "seed1", "--eval-only",
                     "--model-dir", str(tmp_path / "base" / "seed1"), "--load-epoch", "1",
                     "DATASET.SUBSAMPLE_CLASSES", "new")
    assert new.returncode == 0, new.stderr[-3000:]
    records = {}
    for split in ("base", "new"):
        records[split] = json.loads((tmp_path / split / "seed1" / "results.json").read_text())
        assert records[split]["subsample_classes"] == split
        assert records[split]["num_classes"] == 5
    parsed = run([PY, str(REPO / "third_party" / "CoOp" / "parse_test_res.py"), str(tmp_path / "base")])
    assert f"accuracy: {records['base']['metrics']['accuracy']:.2f}%" in parsed.stdout
    parsed = run([PY, str(REPO / "third_party" / "CoOp" / "parse_test_res.py"),
                  str(tmp_path / "new"), "--test-log"])
    assert f"accuracy: {records['new']['metrics']['accuracy']:.2f}%" in parsed.stdout


def test_seed_zero_is_honoured(small_world, tmp_path):
    result = train_coop("ZSCLIP", small_world, tmp_path / "s0", "--eval-only", seed=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Setting fixed seed: 0" in result.stdout
    assert json.loads((tmp_path / "s0" / "results.json").read_text())["seed"] == 0


def test_unknown_trainer_is_one_line_error(small_world, tmp_path):
    result = train_coop("ZSCLIPP", small_world, tmp_path / "x", seed=None)
    assert result.returncode == 1
    assert "error: ValueError" in result.stderr and "ZSCLIP" in result.stderr
    assert "Traceback" not in result.stderr


def test_alignclip_trains_on_base_and_evaluates_on_new(small_world, tmp_path):
    base, new = base_then_new("AlignCLIP", small_world, tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    assert (tmp_path / "base" / "model" / "model.pth.tar-1").is_file()
    assert new.returncode == 0, new.stderr[-3000:]
    assert "Loaded" in new.stdout and "* accuracy:" in new.stdout
    missing = train_coop("AlignCLIP", small_world, tmp_path / "bad", "--eval-only",
                         "--model-dir", tmp_path / "base", "--load-epoch", "7",
                         "DATASET.SUBSAMPLE_CLASSES", "new")
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_clip_world_is_a_dassl_dataset_with_domains_shots_and_base_new(small_world, tmp_path):
    """DATASET.NAME CLIPWorld: source domains in train, target domains in test,
    few-shot sampling and CoOp's base/new subsampling."""
    split = json.loads(open(small_world["coop_clip_world_split"]).read())
    result = train_coop("ZSCLIP", small_world, tmp_path / "cw", "DATASET.NUM_SHOTS", "2",
                        "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.SOURCE_DOMAINS", "['photo']",
                        "DATASET.TARGET_DOMAINS", "['painting']", dataset=CLIP_WORLD_CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "cw" / "results.json").read_text())
    assert record["dataset"] == "CLIPWorld" and record["num_classes"] == 5
    painting_base = [i for i in split["test"] if i[3] == "painting" and i[1] < 5]
    counts = dict(re.findall(r"^# (train_x|test)\s+(\d+)\s*$", result.stdout, re.M))
    assert counts == {"train_x": str(5 * 2), "test": str(len(painting_base))}  # 2 shots, photo
    bad = train_coop("ZSCLIP", {"coop_root": str(tmp_path / "nowhere")}, tmp_path / "bad",
                     dataset=CLIP_WORLD_CONFIG, seed=None)
    assert bad.returncode == 1 and "CLIPWorld: cannot read" in bad.stderr
    assert "Traceback" not in bad.stderr


def tiny_openai_clip(directory):
    """A random OpenAI-format CLIP (CoOp's clip.model) saved as ViT-B-16.pt: 64 px images,
    one layer per tower; what CLIPBENCH_OPENAI_CLIP_DIR serves to CoOp's trainers."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from clip.model import CLIP; "
            "torch.manual_seed(0); m = CLIP(32, 64, 1, 64, 16, 77, 49408, 64, 1, 1); "
            "torch.save(m.state_dict(), sys.argv[2])")
    directory.mkdir()
    made = run([PY, "-c", code, str(REPO / "third_party" / "CoOp"), str(directory / "ViT-B-16.pt")])
    assert made.returncode == 0, made.stderr[-2000:]
    return directory


def test_coops_own_trainer_runs_beside_the_harness_trainers(small_world, tmp_path):
    """CoOp's ZeroshotCLIP (its trainers/zsclip.py, its vendored `clip`) through train_coop.py,
    weights from CLIPBENCH_OPENAI_CLIP_DIR: it writes results.json like the harness's."""
    weights = tiny_openai_clip(tmp_path / "openai")
    out = tmp_path / "zs"
    result = train_coop("ZeroshotCLIP", small_world, out, "--eval-only",
                        "MODEL.BACKBONE.NAME", "ViT-B/16",
                        env={"CLIPBENCH_OPENAI_CLIP_DIR": str(weights)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Loading OpenAI CLIP weights from {weights / 'ViT-B-16.pt'}" in result.stdout
    record = json.loads((out / "results.json").read_text())
    assert record["trainer"] == "ZeroshotCLIP" and 0 <= record["metrics"]["accuracy"] <= 100


def test_coop_is_opened_without_removing_modules_and_once():
    """coop_runner.prepare: CoOp's `trainers.<x>`, `datasets`, `clip` import beside the
    harness's `trainers` package; no sys.modules entry is removed or replaced; a second
    prepare changes nothing (each patch is applied once)."""
    code = """
import sys
import trainers
from trainers import coop_runner, dassl_adapter
before = dict(sys.modules)
coop_runner.prepare()
from dassl.engine.trainer import SimpleTrainer
test, path = SimpleTrainer.test, list(sys.path)
coop_runner.prepare()
assert SimpleTrainer.test is test and sys.path == path
changed = [name for name, module in before.items() if sys.modules.get(name) is not module]
assert not changed, changed
import clip, datasets.oxford_pets, trainers.coop, trainers.zsclip
coop = str(coop_runner.COOP_DIR.resolve())
for module in (clip, datasets.oxford_pets, trainers.coop, trainers.zsclip):
    assert module.__file__.startswith(coop), module.__file__
assert trainers.upstream_patches.__file__.startswith(str(trainers.__path__[0]))
assert dassl_adapter.coop_template("OxfordPets") == trainers.zsclip.CUSTOM_TEMPLATES["OxfordPets"]
print("ok")
"""
    result = run([PY, "-c", code])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_every_coop_patch_is_documented():
    """Each row of the patch table has a docstring and its module is in third_party/README.md."""
    from trainers import upstream_patches
    readme = (REPO / "third_party" / "README.md").read_text()
    for module, changes in upstream_patches.PATCHES.items():
        assert f"`{module}`" in readme, module
        for change in changes:
            assert change.__doc__ and change.__name__ in readme, change.__name__
    for change in upstream_patches.COMMAND_LINE:
        assert change.__doc__ and change.__name__ in readme, change.__name__
