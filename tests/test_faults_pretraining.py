"""The pretraining entry points SIGKILLed mid-training, on the generated world's pairs:
the tiny CLIP (pretraining/tiny_clip.py) restarts cleanly (nothing of the killed run
counts as its cached checkpoint), SharedCLIP / AlignCLIP-IMSep (pretraining/imsep.py)
resumes from its last complete epoch with open_clip_train's `--resume latest`, ComAlign
(algorithms/comalign/train.py) from its last checkpoint; a checkpoint file is always
whole. A non-finite IMSep loss stops the run with one line naming the term."""
import json
import os

import pytest
import torch

from tests import faults
from tests.conftest import PY, run

pytestmark = faults.needs_proc
ENV = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A smaller world than small_world: 162 training pairs, 18 validation pairs, 80
    DomainBed images for the tiny CLIP's zero-shot report."""
    from clipworld import generate
    return generate.generate_world(tmp_path_factory.mktemp("pretrain_world"), seed=0,
                                   image_size=64, per_class_domain=2, compositional_per_class=1,
                                   pretrain_per_class_domain=3, progress=False)


def test_killed_tiny_clip_pretraining_restarts_cleanly(world, tmp_path):
    from pretraining import tiny_clip
    cache = tmp_path / "cache"
    cmd = [PY, "-m", "pretraining.tiny_clip", "--world", world["root"],
           "--cache-dir", str(cache), "--from-scratch", "--epochs", "1", "--warmup", "1"]
    key = tiny_clip.cache_key(tiny_clip.PretrainConfig(epochs=1, warmup=1),
                              tiny_clip.world_options(world["root"]))

    def training():  # open_clip_train has logged its first step, in the staging folder
        logs = list(cache.glob(f".{key}.*/logs/train/out.log")) if cache.is_dir() else []
        return any("Train Epoch: 0" in p.read_text() for p in logs)
    first = faults.start(cmd, env=ENV, log=tmp_path / "first.log")
    try:
        faults.wait_for(training, "open_clip_train's first step", proc=first)
    finally:
        faults.kill_group(first)
    assert tiny_clip.cached_checkpoint(cache, key) is None
    assert not (cache / key).exists()  # only the hidden staging folder of the killed run

    again = run(cmd, env=ENV, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    checkpoint = tiny_clip.cached_checkpoint(cache, key)
    assert checkpoint is not None and again.stdout.strip().splitlines()[-1] == str(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert "logit_scale" in state
    assert tiny_clip.read_report(checkpoint)["key"] == key


def imsep_flags(pairs_csv, logs, epochs, batch=32):
    return ["--model", "tiny-sharedclip", "--train-data", str(pairs_csv), "--dataset-type", "csv",
            "--csv-separator", "\t", "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-3", "--warmup", "2",
            "--wd", "0.1", "--workers", "0", "--precision", "fp32", "--device", "cpu",
            "--logs", str(logs), "--name", "run", "--save-frequency", "1", "--report-to", "",
            "--seed", "0", "--log-every-n-steps", "5", "--clip-inModality-loss"]


def test_killed_imsep_pretraining_resumes_from_its_last_epoch(world, tmp_path):
    checkpoints = tmp_path / "logs" / "run" / "checkpoints"
    cmd = [PY, "-m", "pretraining.imsep", *imsep_flags(world["pairs_train_csv"],
                                                       tmp_path / "logs", epochs=4, batch=16)]
    first = faults.start(cmd, env=ENV, log=tmp_path / "first.log")
    try:
        faults.wait_for(lambda: (checkpoints / "epoch_1.pt").exists(), "the first epoch",
                        proc=first, interval=0.02)
    finally:
        faults.kill_group(first)
    assert not (checkpoints / "epoch_4.pt").exists(), "killed too late"
    for path in checkpoints.glob("epoch_*.pt"):  # whatever the kill left is whole
        assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] >= 1

    again = run(cmd + ["--resume", "latest"], env=ENV, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "Found latest resume checkpoint at" in log and "=> resuming checkpoint" in log
    final = torch.load(checkpoints / "epoch_4.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == 4
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_atomic_torch_save_never_leaves_half_a_checkpoint(tmp_path):
    """What pretraining/open_clip_run.py puts in place of torch.save during an open_clip_train run."""
    from pretraining import open_clip_run

    def dies(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK\x03\x04 half")  # what a killed torch.save leaves
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        open_clip_run.atomic_torch_save(dies)({"epoch": 2}, str(tmp_path / "epoch_2.pt"))
    assert list(tmp_path.iterdir()) == []
    open_clip_run.atomic_torch_save(torch.save)({"epoch": 2}, str(tmp_path / "epoch_2.pt"))
    assert torch.load(tmp_path / "epoch_2.pt", weights_only=True) == {"epoch": 2}


def test_nonfinite_imsep_loss_stops_the_run_naming_the_term(world, tmp_path):
    """--beta nan: the in-modality term is NaN at the first step; one line, no checkpoint."""
    cmd = [PY, "-m", "pretraining.imsep", *imsep_flags(world["pairs_val_csv"],
                                                       tmp_path / "logs", epochs=1, batch=16),
           "--beta", "nan"]
    result = run(cmd, env=ENV, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: FloatingPointError: AlignCLIP-IMSep: non-finite loss at step 0 "
                      "of this run: imsep_loss = nan; the run stops here (CLIPBENCH_TRACEBACK=1 "
                      "shows the traceback)"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "logs").rglob("epoch_*.pt"))


def test_killed_comalign_training_resumes_from_its_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    epochs = 30
    cmd = [PY, "-m", "algorithms.comalign.train", "--train",
           f"world:{world['root']},split=val", "--clip-model", "tiny-vit",
           "--clip-pretrained", "", "--out", str(out), "--epochs", str(epochs),
           "--batch-size", "4", "--device", "cpu", "--no-progress"]
    env = {**ENV, "CLIPBENCH_CACHE": str(tmp_path / "cache")}
    first = faults.start(cmd, env=env, log=tmp_path / "first.log")
    try:
        faults.wait_for(lambda: (out / "checkpoint.pt").exists(), "the first epoch", proc=first,
                        interval=0.02)
    finally:
        faults.kill_group(first)
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # always a whole file
    assert state["epoch"] < epochs - 1, "killed too late"
    assert not (out / "train_log.json").exists()

    again = run(cmd, env=env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"ComAlign: resuming {out / 'checkpoint.pt'} after epoch" in again.stdout
    log = json.loads((out / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == list(range(-1, epochs))  # each epoch once
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == epochs - 1
    assert os.path.basename(log["checkpoint"]) == "checkpoint.pt"
