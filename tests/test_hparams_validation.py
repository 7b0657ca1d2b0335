"""`--hparams` with unknown keys or values of the wrong JSON type: a one-line error that
names the known keys or the expected type (algorithms/core/hparams.py check_overrides,
domainbed_adapter/hparams_check.py), never silently ignored."""
import json
import sys
import types

import pytest

from algorithms.core.hparams import check_overrides
from tests.conftest import PY, TINY, needs_domainbed, run

DEFAULTS = {"lr": 1e-5, "batch_size": 36, "use_aal": True, "templates": "photo",
            "class_names": [], "comalign_checkpoint": ""}


def test_known_keys_of_the_right_type_pass():
    check_overrides({"lr": 1, "batch_size": 8, "use_aal": False, "templates": "a {}.",
                     "class_names": ["a", "b"]}, DEFAULTS, "here")  # an integer is a number


@pytest.mark.parametrize("overrides, message", [
    ({"lrr": 1e-4}, "here: unknown hyperparameter lrr; known: batch_size, class_names, "
                    "comalign_checkpoint, lr, templates, use_aal"),
    ({"lrr": 1, "bs": 2}, "here: unknown hyperparameters bs, lrr; known: batch_size, "
                          "class_names, comalign_checkpoint, lr, templates, use_aal"),
    ({"batch_size": 8.5}, "here: batch_size must be an integer (default 36), got a number 8.5"),
    ({"batch_size": True}, "here: batch_size must be an integer (default 36), got a boolean True"),
    ({"use_aal": 1}, "here: use_aal must be a boolean (default True), got an integer 1"),
    ({"lr": "1e-4"}, "here: lr must be a number (default 1e-05), got a string '1e-4'"),
    ({"class_names": "a,b"}, "here: class_names must be a list (default []), got a string 'a,b'"),
    ({"comalign_checkpoint": None},
     "here: comalign_checkpoint must be a string (default ''), got null None"),
    (["lr", 1], "here: expected a JSON object of hyperparameters, got a list"),
])
def test_unknown_keys_and_wrong_types_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as e:
        check_overrides(overrides, DEFAULTS, "here")
    assert str(e.value) == message


@pytest.fixture
def train_script(monkeypatch):
    """Make this process look like DomainBed's train.py with the given arguments."""
    import domainbed.hparams_registry  # noqa: F401  (patched by the hook, or below)
    from domainbed_adapter import patches
    patches.patch_loaded()
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="domainbed.scripts.train")
    monkeypatch.setitem(sys.modules, "__main__", main)

    def args(algorithm, dataset, hparams):  # train.py's parsed arguments (never re-parsed)
        main.args = types.SimpleNamespace(algorithm=algorithm, dataset=dataset, hparams=hparams)
    return args


@needs_domainbed
def test_train_hparams_of_a_harness_algorithm_are_checked(train_script):
    from domainbed import hparams_registry
    train_script("CLIPood", "PACS", json.dumps({"margin": 0.2}))
    for draw in (lambda: hparams_registry.default_hparams("CLIPood", "PACS"),
                 lambda: hparams_registry.random_hparams("CLIPood", "PACS", 3)):
        with pytest.raises(ValueError) as e:
            draw()
        message = str(e.value)
        assert message.startswith("--hparams for CLIPood on PACS: unknown hyperparameter margin; "
                                  "known: ") and "\n" not in message
        # the method's own keys, upstream's generic ones and the datasets' are all named
        assert all(k in message for k in ("margin_alpha", "bma_beta", "data_augmentation",
                                          "class_names"))
    train_script("CLIPood", "PACS", json.dumps({"batch_size": "36"}))
    with pytest.raises(ValueError, match=r"batch_size must be an integer \(default 12\), got "
                                         r"a string '36'$"):
        hparams_registry.default_hparams("CLIPood", "PACS")
    train_script("CLIPood", "PACS", '{"lr": }')
    with pytest.raises(ValueError, match=r"^--hparams is not valid JSON \(Expecting value"):
        hparams_registry.default_hparams("CLIPood", "PACS")


@needs_domainbed
def test_dataset_keys_are_known_where_a_dataset_reads_them(train_script):
    from domainbed import hparams_registry
    train_script("ZSCLIP", "PACSOpen", json.dumps({**TINY, "open_ratio": 0.3}))
    assert "open_ratio" not in hparams_registry.default_hparams("ZSCLIP", "PACSOpen")  # no raise
    train_script("ZSCLIP", "PACS", json.dumps({"open_ratio": 0.3}))
    with pytest.raises(ValueError, match="unknown hyperparameter open_ratio"):
        hparams_registry.default_hparams("ZSCLIP", "PACS")
    train_script("ZSCLIP", "ColoredMNIST", json.dumps({"class_names": ["zero", "one"]}))
    hparams_registry.default_hparams("ZSCLIP", "ColoredMNIST")


@needs_domainbed
def test_upstream_algorithms_and_other_callers_keep_upstream_behaviour(train_script):
    from domainbed import hparams_registry
    train_script("ERM", "PACS", json.dumps({"anything": 1}))
    assert "anything" not in hparams_registry.default_hparams("ERM", "PACS")
    train_script("CLIPood", "VLCS", json.dumps({"anything": 1}))  # another job's arguments
    hparams_registry.default_hparams("CLIPood", "PACS")


@needs_domainbed
def test_train_script_refuses_an_unknown_key_before_building_anything(small_world, tmp_path):
    out = tmp_path / "job"
    result = run([PY, "-m", "domainbed.scripts.train", "--algorithm", "CLIPFT",
                  "--dataset", "CLIPWorld", "--data_dir", small_world["domainbed_root"],
                  "--steps", "1", "--output_dir", str(out),
                  "--hparams", json.dumps({**TINY, "learning_rate": 1e-4})], cwd=tmp_path)
    assert result.returncode != 0
    last = (result.stdout + result.stderr).strip().splitlines()[-1]  # train.py tees stderr
    assert last.startswith("ValueError: --hparams for CLIPFT on CLIPWorld: unknown "
                           "hyperparameter learning_rate; known: ") and " lr, " in last
    assert not (out / "done").exists() and not (out / "results.jsonl").exists()
