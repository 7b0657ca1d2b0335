"""DomainBed's own unit tests (third_party/DomainBed/domainbed/test/) with the harness
installed: the modules that run on a CPU, unchanged, and upstream's test_models for the
harness's algorithms on the Debug datasets (placeholder class names and the tiny CLIP:
domainbed_adapter/debug_datasets.py).

Left out here: test_networks and, for upstream's own algorithms, test_models (every
test calls .cuda(); green on a GPU machine), test_datasets and scripts/test_train (they
skip without DATA_DIR). The whole suite on a GPU machine:
    cd third_party/DomainBed && python -m unittest discover
"""
import importlib.util
import itertools
import json
import re

import pytest

from tests.conftest import PY, THIRD_PARTY, needs_domainbed, run

DOMAINBED = THIRD_PARTY / "DomainBed"
CPU_MODULES = ("domainbed.test.test_hparams_registry", "domainbed.test.test_model_selection",
               "domainbed.test.lib.test_misc", "domainbed.test.lib.test_query",
               "domainbed.test.scripts.test_collect_results", "domainbed.test.scripts.test_sweep")
CPU_DEBUG_DATASETS = ("Debug28",)  # Debug224 runs the same code (images at the model's size)

pytestmark = [needs_domainbed, pytest.mark.skipif(
    importlib.util.find_spec("parameterized") is None,
    reason="DomainBed's tests import `parameterized` (pip install parameterized)")]

# upstream's test_models.TestAlgorithms for chosen (dataset, algorithm) pairs; on a
# machine without CUDA its .cuda() calls leave tensors and modules where they are
MODELS_RUNNER = r"""
import itertools, json, re, sys, unittest
import torch
if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
from domainbed import algorithms
from domainbed.test import helpers, test_models
datasets, names = sys.argv[1].split(","), sys.argv[2].split(",")
pairs = list(itertools.product(helpers.DEBUG_DATASETS, algorithms.ALGORITHMS))
chosen = {i for i, (d, a) in enumerate(pairs) if d in datasets and a in names}
suite = unittest.TestSuite(
    t for t in unittest.defaultTestLoader.loadTestsFromTestCase(test_models.TestAlgorithms)
    if int(re.match(r"test_init_update_predict_(\d+)_", t._testMethodName).group(1)) in chosen)
result = unittest.TextTestRunner(verbosity=0).run(suite)
print(json.dumps({"ran": result.testsRun, "chosen": len(chosen),
                  "failed": [str(t) + ": " + e.strip().splitlines()[-1]
                             for t, e in result.failures + result.errors]}))
"""


def test_cpu_capable_upstream_modules_pass():
    from domainbed import algorithms, datasets
    proc = run([PY, "-m", "unittest", *CPU_MODULES], cwd=DOMAINBED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = int(re.search(r"^Ran (\d+) tests?", proc.stderr, re.M).group(1))
    # the registry test alone covers every algorithm (the harness's too) x every dataset
    assert ran > len(algorithms.ALGORITHMS) * len(datasets.DATASETS)
    assert {"CLIPood", "AlignCLIP", "ZSCLIP"} <= set(algorithms.ALGORITHMS)


def test_upstream_test_models_builds_every_harness_algorithm():
    from algorithms.core import registry
    names = sorted(registry.methods())
    proc = run([PY, "-c", MODELS_RUNNER, ",".join(CPU_DEBUG_DATASETS), ",".join(names)],
               cwd=DOMAINBED, env={"CLIPBENCH_NUM_WORKERS": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == []
    assert summary["ran"] == summary["chosen"] == len(names) * len(CPU_DEBUG_DATASETS)


def test_debug_datasets_give_harness_algorithms_names_and_their_image_size():
    import torch
    from domainbed import datasets, hparams_registry
    from domainbed_adapter import job, patches
    patches.patch_loaded()
    hparams = hparams_registry.default_hparams("AlignCLIP", "Debug28")
    assert (hparams["clip_model"], hparams["clip_pretrained"]) == ("tiny-vit", "")
    assert hparams["aligned_layers"] == 2  # the recipe book's tiny values: tiny-vit has 4 blocks
    drawn = hparams_registry.random_hparams("AlignCLIP", "Debug224", 7)
    assert (drawn["clip_model"], drawn["aligned_layers"]) == ("tiny-vit", 2)
    for name in ("Debug28", "Debug224"):
        hparams = hparams_registry.default_hparams("ZSCLIP", name)
        dataset = datasets.get_dataset_class(name)("", [], hparams)
        assert job.class_names(job.for_hparams(hparams), hparams) == ["class 0", "class 1"]
        assert "class_names" not in hparams
        assert dataset.input_shape == (3, 64, 64) and dataset[0][0][0].shape == (3, 64, 64)
        assert torch.equal(dataset[1].tensors[1], dataset[1].tensors[1].long())
    upstream = hparams_registry.default_hparams("ERM", "Debug28")
    dataset = datasets.Debug28("", [], upstream)
    assert dataset.input_shape == (3, 28, 28) and "class_names" not in upstream
    given = dict(hparams_registry.default_hparams("ZSCLIP", "Debug28"), class_names=["a", "b"])
    datasets.Debug28("", [], given)
    assert job.class_names(job.for_hparams(given), given) == ["a", "b"]
