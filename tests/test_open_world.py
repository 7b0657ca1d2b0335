"""Domain + class shift through DomainBed's own scripts (domainbed_adapter/open_world.py):
the class split, base-only training data, the test domain scored on base and open
classes, the collector's base/open/HM table; and methods that train on base classes."""
import json

import pytest
import torch

import recipes
from algorithms.core.registry import get_method
from tests.conftest import TINY, launch_sweep, needs_domainbed

BASE = 5  # CLIPWorld's 10 classes, open_ratio 0.5


def labels_of(split):
    return sorted({int(split[i][1]) for i in range(len(split))})


@needs_domainbed
def test_splits_keep_open_classes_out_of_training_and_selection(small_world):
    import domainbed.datasets
    import domainbed.hparams_registry
    from domainbed.lib import misc
    from domainbed_adapter import patches
    patches.patch_loaded()
    assert "CLIPWorldOpen" in domainbed.datasets.DATASETS
    assert "OfficeHomeOpen" in domainbed.datasets.DATASETS
    hparams = dict(domainbed.hparams_registry.default_hparams("CLIPood", "CLIPWorldOpen"), **TINY)
    dataset = domainbed.datasets.CLIPWorldOpen(small_world["domainbed_root"], [0], hparams)
    from domainbed_adapter import job
    running = job.for_hparams(hparams)  # the job's facts stay out of the hyperparameters
    assert dataset.base_classes == BASE and len(job.class_names(running, hparams)) == 10
    assert "train_classes" not in hparams and "class_names" not in hparams
    splits = {}
    for i, env in enumerate(dataset):  # as train.py splits
        out, in_ = misc.split_dataset(env, int(len(env) * 0.2), misc.seed_hash(0, i))
        uda = []
        if i == 0:
            uda, in_ = misc.split_dataset(in_, 0, misc.seed_hash(0, i))
        splits[i] = (out, in_, uda)
    for i in (1, 2, 3):  # training domains: base classes only, in and out
        out, in_, _ = splits[i]
        assert labels_of(in_) == labels_of(out) == list(range(BASE))
    out, in_, uda = splits[0]
    assert labels_of(out) == labels_of(in_) == list(range(BASE))
    assert labels_of(uda) == list(range(BASE, 10))
    assert len(out) + len(in_) + len(uda) == len(dataset[0])  # every test image scored once
    assert abs(len(out) - 0.2 * (len(out) + len(in_))) <= 1  # the holdout fraction of base


@needs_domainbed
def test_sweep_scores_base_and_open_and_the_collector_makes_the_hm_table(small_world, tmp_path):
    from results import collect
    out = tmp_path / "sweep"
    hparams = {**TINY, "batch_size": 8, "lr": 1e-4}
    launched = launch_sweep(["--datasets", "CLIPWorldOpen", "--algorithms", "CLIPood",
                             "--data_dir", small_world["domainbed_root"], "--output_dir", out,
                             "--command_launcher", "local_parallel", "--n_hparams", "1",
                             "--n_trials", "1", "--single_test_envs", "--steps", "2",
                             "--hparams", json.dumps(hparams), "--skip_confirmation"], tmp_path)
    assert launched.returncode == 0, launched.stderr[-2000:]
    jobs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(jobs) == 4 and all((j / "done").exists() for j in jobs)
    record = json.loads((jobs[0] / "results.jsonl").read_text().splitlines()[-1])
    assert record["hparams"]["train_classes"] == BASE
    assert record["hparams"]["total_steps"] == 2  # the schedule follows the job's --steps
    assert 0 <= record["env0_uda_acc"] <= 1 and "env1_uda_acc" not in record
    assert collect.main([str(out), "--out", str(tmp_path / "tables"), "--no-figures"]) == 0
    table = (tmp_path / "tables" / "domainbed_iid_CLIPWorldOpen_base_open.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| CLIPood"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    base, opened, hm = (float(c.split()[0]) for c in cells[-3:])
    assert hm == pytest.approx(2 * base * opened / (base + opened), abs=0.06)
    assert (tmp_path / "tables" / "domainbed_oracle_CLIPWorldOpen_base_open.md").exists()


@pytest.mark.parametrize("name", ["CLIPFT", "CLIPood", "AlignCLIP", "CLIPLP", "CALIPFS"])
def test_training_sees_only_the_base_classes_prediction_all(name):
    method_cls = get_method(name)
    torch.manual_seed(0)
    values = dict(TINY)
    if name == "AlignCLIP":
        values.update(aligned_layers=2, dv_layers=2)
    method = method_cls.create(["circle", "square", "star"], values, train_classes=2,
                               total_steps=2, images_per_step=4)
    assert method.train_class_embeddings.shape[0] == 2
    x = torch.randn(4, 3, 64, 64)
    summary = method.update(x, torch.tensor([0, 1, 0, 1]))
    assert torch.isfinite(torch.tensor(summary["loss"]))
    assert method.predict(x).shape == (4, 3)
    with pytest.raises(IndexError):  # an open-class label cannot be a training target
        method.update(x, torch.tensor([0, 1, 2, 1]))


def test_margin_logits_of_a_base_only_classifier():
    from algorithms.clipood import margin_logits
    method_cls = get_method("CLIPood")
    torch.manual_seed(0)
    method = method_cls.create(["a", "b", "c"], TINY, train_classes=2)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with torch.no_grad():
        loss, _ = method.loss(x, y)
        features = torch.nn.functional.normalize(method.visual(x), dim=-1)
        logits = margin_logits(features, method.class_embeddings[:2], y, 0.3, method.logit_scale)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y))


@needs_domainbed
def test_baselines_keep_their_own_published_recipes():
    from domainbed import hparams_registry

    def defaults(method, dataset):  # what a DomainBed job of the method gets (the book's)
        return {**get_method(method).default_hparams(),
                **recipes.values(method, "domainbed", dataset)}
    for dataset in ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet"):
        hp = defaults("CLIPood", dataset)
        assert hp["margin_alpha"] == 0.3 and hp["batch_size"] == 12 and hp["bma_beta"] == 0.5
        assert hparams_registry.default_hparams("CLIPood", dataset)["batch_size"] == 12
    assert defaults("CLIPood", "PACS")["steps"] == 5000
    assert defaults("CLIPood", "DomainNet")["steps"] == 10000
    assert defaults("CLIPood", "OfficeHome")["lr"] == 1e-5
    assert defaults("CLIPood", "PACS")["lr"] == 5e-6
    assert defaults("AlignCLIP", "DomainNet")["margin_alpha"] == 0.1
    assert defaults("AlignCLIP", "DomainNet")["steps"] == 10000
    assert defaults("AlignCLIP", "PACS")["batch_size"] == 36
    wild = defaults("CLIPood", "OfficeHomeOpen")  # CLIPood scripts.sh, in_the_wild
    assert (wild["lr"], wild["margin_alpha"], wild["bma_beta"]) == (3e-6, 0.1, 0.1)
    assert defaults("CLIPood", "DomainNetOpen")["margin_alpha"] == 0.1
    registry = hparams_registry.default_hparams("AlignCLIP", "OfficeHomeOpen")
    assert (registry["lr"], registry["margin_alpha"], registry["batch_size"]) == (3e-6, 0.1, 36)
    assert all(recipe.source for recipe in recipes.recipe("CLIPood", "domainbed",
                                                          "OfficeHomeOpen").values())
