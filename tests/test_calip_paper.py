"""CALIPPaper, CALIP's published per-dataset betas as a named setting: fixed betas, nothing
selected; the pairs are the recipe book's (coop_protocols, per CoOp dataset) and reach the
runs the protocols runner plans; the default search grid of CALIP / CALIPOracle spans every
published pair; a train_coop.py run records the betas it used."""
import json
import os
import subprocess

import torch

import sweeps.coop_protocols as protocols
from algorithms import calip as cp
from algorithms import calip_search
from algorithms.core import selection
from algorithms.core.registry import get_method
from common import env as harness_env
from tests.conftest import PY, REPO, TINY, needs_coop

CLASSES = ["circle", "square", "star"]


def make(name, **overrides):
    torch.manual_seed(0)
    return get_method(name).create(CLASSES, {**TINY, **overrides})


def paper_pairs() -> dict:
    """{CoOp dataset key: (beta2, beta3)} from the recipe book's CALIPPaper opts."""
    pairs = {}
    for dataset, opts in protocols.load_settings("CALIPPaper").opts_by_dataset.items():
        values = dict(zip(opts[::2], opts[1::2]))
        pairs[dataset] = (float(values["TRAINER.CALIPPAPER.BETA2"]),
                          float(values["TRAINER.CALIPPAPER.BETA3"]))
    return pairs


def test_paper_setting_uses_its_betas_and_selects_nothing():
    method = make("CALIPPaper", beta2=6.08, beta3=0.06)
    assert (method.selects_on, method.oracle) == (None, False)
    assert method.betas.tolist() == [6.08, 0.06]
    assert not {"beta2_max", "beta3_max", "beta_grid"} & set(method.hparams())  # no search

    def provide(which):
        raise AssertionError(f"asked for {which} data")
    assert selection.run(method, provide) == {}
    assert method.betas.tolist() == [6.08, 0.06]
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        scores = method.scores(images)
        expected = method.logit_scale * (scores.s0 + 6.08 * scores.s2 + 0.06 * scores.s3)
        torch.testing.assert_close(method.predict(images), expected)
    other = make("CALIPPaper", beta2=0.5, beta3=0.01)
    with torch.no_grad():
        assert not torch.allclose(other.predict(images), expected)  # the betas matter


def test_defaults_are_the_imagenet_pair_and_calips_declared_betas():
    paper, calip = make("CALIPPaper"), make("CALIP")
    assert paper.betas.tolist() == calip.betas.tolist() == list(paper_pairs()["imagenet"])


def test_the_book_gives_a_pair_for_each_of_coops_eleven_datasets():
    pairs = paper_pairs()
    assert set(pairs) == set(protocols.TARGETS["base2new"])
    for dataset, opts in protocols.load_settings("CALIPPaper").opts_by_dataset.items():
        protocols.check_method_opts("CALIPPaper", opts)  # declared keys, float values
        assert protocols.dataset_by_name(dataset).key == dataset
    assert all(0 < b2 and 0 < b3 for b2, b3 in pairs.values())


def test_default_search_grid_reaches_every_published_pair():
    pairs = paper_pairs()
    assert any(b2 > 2.0 or b3 > 0.1 for b2, b3 in pairs.values())  # outside the yaml's range
    for name in ("CALIP", "CALIPOracle"):
        cfg = make(name).cfg
        beta2s = calip_search.beta_grid(cfg.beta2_max, cfg.beta_grid, cfg.beta_min)
        beta3s = calip_search.beta_grid(cfg.beta3_max, cfg.beta_grid, cfg.beta_min)
        step2 = float(beta2s[1] - beta2s[0])
        assert step2 <= 0.0101  # about the reference's step ((2.0 - 0.001) / 200)
        for b2, b3 in pairs.values():
            assert beta2s[0] <= b2 <= beta2s[-1] and beta3s[0] <= b3 <= beta3s[-1], (name, b2, b3)


def test_imagenet_runs_use_the_references_own_grid():
    for name in ("CALIP", "CALIPOracle"):
        opts = protocols.load_settings(name).opts_by_dataset["imagenet"]
        values = {k.rsplit(".", 1)[1]: v for k, v in zip(opts[::2], opts[1::2])}
        assert (values["BETA2_MAX"], values["BETA3_MAX"], values["BETA_GRID"]) == \
            ("2.0", "0.1", "200")
        assert values["TEMPLATES"] == "simple_imagenet"
        protocols.check_method_opts(name, opts)


def test_planned_runs_carry_each_datasets_pair():
    settings = protocols.load_settings("CALIPPaper")
    assert not settings.train
    eurosat = protocols.dataset_by_name("eurosat")
    runs = protocols.plan("base2new", [settings], [eurosat], {"eurosat": {}}, [1], 16,
                          "/data", "/out", [])
    assert [r.stage for r in runs] == ["train_base", "test_new"]
    b2, b3 = paper_pairs()["eurosat"]
    for run in runs:
        opts = dict(zip(run.opts[::2], run.opts[1::2]))
        assert (float(opts["TRAINER.CALIPPAPER.BETA2"]),
                float(opts["TRAINER.CALIPPAPER.BETA3"])) == (b2, b3)
        assert "--eval-only" in run.flags


def test_rn101_backbone_config_is_the_references():
    text = (REPO / "trainers" / "configs" / "backbones" / "rn101.yaml").read_text()
    rn50 = (REPO / "trainers" / "configs" / "backbones" / "rn50.yaml").read_text()
    assert 'MODEL: "RN101"' in text and 'PRETRAINED: "openai"' in text
    strip = lambda t: [line for line in t.splitlines()  # noqa: E731
                       if not line.startswith("#") and "MODEL:" not in line]
    assert strip(text) == strip(rn50)  # the same preprocessing and loaders as RN50


@needs_coop
def test_coop_run_records_the_paper_betas(small_world, tmp_path):
    out = tmp_path / "calip_paper"
    dataset_cfg = REPO / "third_party" / "CoOp" / "configs" / "datasets" / "oxford_pets.yaml"
    cmd = [PY, "train_coop.py", "--trainer", "CALIPPaper", "--root", small_world["coop_root"],
           "--dataset-config-file", str(dataset_cfg), "--config-file",
           str(REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml"),
           "--seed", "1", "--output-dir", str(out), "--eval-only",
           "TRAINER.CALIPPAPER.BETA2", "0.61", "TRAINER.CALIPPAPER.BETA3", "0.01"]
    env = {**os.environ, harness_env.CACHE: str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CALIPPaper: fixed beta2=0.61 beta3=0.01 (no search)" in result.stdout
    record = json.loads((out / "results.json").read_text())
    assert record["trainer"] == "CALIPPaper" and "selection" not in record
    config = record["run"]["config"]
    assert (config["beta2"], config["beta3"]) == (0.61, 0.01)
    assert record["run"]["method"] == "CALIPPaper"


def test_calip_paper_is_documented_with_its_source():
    page = (REPO / "docs" / "methods" / "calip.md").read_text()
    assert "CALIPPaper" in page and "SuS-X" in page and "run_calip_baseline.py" in page
    assert cp.CALIPPaper.__doc__ and "recipe book" in cp.CALIPPaper.__doc__
