"""The DomainBed adapter inside one process (upstream needed)."""
import json
import os
import sys

import pytest
import torch

from tests.conftest import TINY, needs_domainbed

pytestmark = needs_domainbed


@pytest.fixture(scope="module")
def domainbed():
    import domainbed.algorithms
    import domainbed.datasets
    import domainbed.hparams_registry
    import domainbed.lib.fast_data_loader
    import domainbed.lib.reporting
    from domainbed_adapter import patches
    patches.patch_loaded()  # no-op when the .pth hook already patched them
    return domainbed


def test_algorithm_and_dataset_are_registered(domainbed):
    assert "ZSCLIP" in domainbed.algorithms.ALGORITHMS
    assert domainbed.algorithms.get_algorithm_class("ZSCLIP").method_cls.name == "ZSCLIP"
    assert "CLIPWorld" in domainbed.datasets.DATASETS
    assert domainbed.datasets.num_environments("CLIPWorld") == 4
    import domainbed.command_launchers
    assert "local_parallel" in domainbed.command_launchers.REGISTRY


def test_hook_patches_exactly_the_modules_of_the_patch_table():
    from domainbed_adapter import hook, patches
    assert set(patches.PATCHES) == {"domainbed.command_launchers", "domainbed.algorithms",
                                     "domainbed.hparams_registry", "domainbed.datasets",
                                     "domainbed.lib.misc", "domainbed.lib.fast_data_loader",
                                     "domainbed.lib.reporting", "domainbed.model_selection"}
    hook.install()
    finder = next(f for f in sys.meta_path if isinstance(f, hook._PatchingFinder))
    assert finder.find_spec("domainbed.scripts.train", None) is None
    assert finder.find_spec("domainbed.lib.misc", None).loader.__class__ is hook._PatchingLoader


def test_hparams_are_declared_with_defaults_and_seeded_draws(domainbed):
    registry = domainbed.hparams_registry
    defaults = registry.default_hparams("ZSCLIP", "PACS")
    assert defaults["clip_model"] == "ViT-B-16" and defaults["clip_pretrained"] == "openai"
    assert registry.random_hparams("ZSCLIP", "PACS", 7) == registry.random_hparams("ZSCLIP", "PACS", 7)
    assert "clip_model" not in registry.default_hparams("ERM", "PACS")
    json.dumps(registry.random_hparams("ZSCLIP", "VLCS", 3))


def test_world_gets_clip_preprocessing_and_class_names(domainbed, small_world):
    from clipworld import generate as world
    hparams = dict(domainbed.hparams_registry.default_hparams("ZSCLIP", "CLIPWorld"), **TINY)
    dataset = domainbed.datasets.CLIPWorld(small_world["domainbed_root"], [0], hparams)
    from domainbed_adapter import job
    assert job.class_names(job.for_hparams(hparams), hparams) == list(world.CLASSES)
    assert "class_names" not in hparams  # the job's facts stay out of the hyperparameters
    assert dataset.input_shape == (3, 64, 64)
    env_train, env_test = dataset[1], dataset[0]
    assert "RandomResizedCrop" in repr(env_train.transform)
    assert "CenterCrop" in repr(env_test.transform) and "RandomResizedCrop" not in repr(env_test.transform)
    image, label = env_test[0]
    assert image.shape == (3, 64, 64) and label == 0
    assert dataset.N_WORKERS == 0


def test_upstream_algorithms_keep_upstream_preprocessing(domainbed, small_world):
    hparams = domainbed.hparams_registry.default_hparams("ERM", "CLIPWorld")
    dataset = domainbed.datasets.CLIPWorld(small_world["domainbed_root"], [0], hparams)
    assert "class_names" not in hparams and dataset.input_shape == (3, 224, 224)


def test_corrupt_image_names_its_path(domainbed, tmp_path):
    for env in ("a", "b"):
        (tmp_path / env / "cat").mkdir(parents=True)
        (tmp_path / env / "cat" / "0.png").write_bytes(b"garbage")
    hparams = dict(domainbed.hparams_registry.default_hparams("ZSCLIP", "CLIPWorld"), **TINY)
    dataset = domainbed.datasets.MultipleEnvironmentImageFolder(str(tmp_path), [0], False, hparams)
    with pytest.raises(OSError, match="cannot read image .*0.png"):
        dataset[0][0]
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        domainbed.datasets.MultipleEnvironmentImageFolder(str(tmp_path / "nope"), [0], False, hparams)


def test_small_training_split_fails_instead_of_spinning(domainbed):
    data = torch.utils.data.TensorDataset(torch.zeros(5, 1), torch.zeros(5))
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        domainbed.lib.fast_data_loader.InfiniteDataLoader(data, None, 8, 0)


def test_a_job_with_a_damaged_results_line_is_left_out_by_collect_results(domainbed, tmp_path,
                                                                         capsys):
    """Upstream's reader skipped the bad line and scored the rest; the harness's patch
    leaves the whole job out and names file and line."""
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.jsonl").write_text('{"step": 1}\n{"step": 2, "acc')
    assert len(domainbed.lib.reporting.load_records(str(tmp_path))) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "results.jsonl:1: a record without" in err[0]
    assert "job left out" in err[0]


def test_adapter_gives_method_logits_and_saves_only_trained_state(domainbed, small_world):
    hparams = dict(domainbed.hparams_registry.default_hparams("ZSCLIP", "CLIPWorld"), **TINY)
    hparams["class_names"] = ["circle", "square"]
    torch.manual_seed(0)
    algorithm = domainbed.algorithms.get_algorithm_class("ZSCLIP")((3, 64, 64), 2, 3, hparams)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(algorithm.predict(x), algorithm.method.predict(x))
    assert algorithm.update([(x, torch.tensor([0, 1]))]) == {}
    assert algorithm.state_dict() == {}
    with pytest.raises(ValueError, match="class names"):
        domainbed.algorithms.get_algorithm_class("ZSCLIP")((3, 64, 64), 3, 3, hparams)


def test_local_parallel_launcher_runs_every_command_with_its_thread_share(tmp_path, monkeypatch):
    from common import env
    from domainbed_adapter import launchers
    monkeypatch.setenv(env.PARALLEL_JOBS, "2")
    commands = [f'sleep 0.3; echo "$OMP_NUM_THREADS" > {tmp_path}/job{i}' for i in range(5)]
    launchers.local_parallel_launcher(commands)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"job{i}" for i in range(5)]
    assert {(tmp_path / f"job{i}").read_text().strip() for i in range(5)} == {threads}


def test_local_parallel_launcher_runs_python_commands_on_this_interpreter(tmp_path, monkeypatch):
    from domainbed_adapter import launchers
    monkeypatch.setenv("PATH", str(tmp_path))  # no `python` on PATH: only this interpreter
    out = tmp_path / "which"
    launchers.local_parallel_launcher(
        [f"python -c \"import sys; open({str(out)!r}, 'w').write(sys.executable)\""])
    assert out.read_text() == sys.executable


def test_launchers_sharing_a_slots_folder_never_run_more_jobs_than_its_size(tmp_path, monkeypatch):
    import threading
    from common import env
    from domainbed_adapter import launchers
    monkeypatch.setenv(env.PARALLEL_JOBS, "2")
    monkeypatch.setenv(env.PARALLEL_SLOTS, str(tmp_path / "slots"))
    (tmp_path / "running").mkdir()
    counts = tmp_path / "counts"

    def job(name):  # how many jobs run while this one starts
        return (f"mkdir {tmp_path}/running/{name}; ls {tmp_path}/running | wc -l >> {counts}; "
                f"sleep 0.4; rmdir {tmp_path}/running/{name}")
    sweeps = [threading.Thread(target=launchers.local_parallel_launcher,
                               args=([job(f"{s}{i}") for i in range(3)],)) for s in "ab"]
    for sweep in sweeps:
        sweep.start()
    for sweep in sweeps:
        sweep.join()
    seen = [int(n) for n in counts.read_text().split()]
    assert len(seen) == 6 and max(seen) == 2


def test_demo_groups_algorithms_by_their_hparams():
    from sweeps import demo
    groups = demo.sweep_groups(["ZSCLIP", "CLIPood", "AlignCLIP", "CALIP", "CLIPLP"],
                               "/ckpt.pt", "tiny-vit", steps=30)
    by_name = {name: hp for names, hp, _ in groups for name in names}
    steps = {name: n for names, _, n in groups for name in names}
    assert steps["ZSCLIP"] == 1 and steps["CLIPood"] == 30
    assert by_name["CLIPood"]["lr"] == 3e-5 and "lr" not in by_name["CLIPLP"]
    assert by_name["CLIPLP"]["lp_init"] == "zeroshot"
    assert by_name["AlignCLIP"]["aligned_layers"] == 2
    assert all(hp["clip_pretrained"] == "/ckpt.pt" and hp["templates"] == "photo"
               for hp in by_name.values())
    assert sorted(len(names) for names, _, _ in groups) == [1, 1, 1, 2]  # ZSCLIP with CALIP


def test_training_domains_held_out_images_are_read_without_augmentation(domainbed, small_world):
    from domainbed.lib import misc
    hparams = dict(domainbed.hparams_registry.default_hparams("ZSCLIP", "CLIPWorld"), **TINY)
    dataset = domainbed.datasets.CLIPWorld(small_world["domainbed_root"], [0], hparams)
    out, in_ = misc.split_dataset(dataset[1], int(len(dataset[1]) * 0.2), misc.seed_hash(0, 1))
    assert "CenterCrop" in repr(out.transform) and "RandomResizedCrop" in repr(dataset[1].transform)
    torch.testing.assert_close(out[0][0], out[0][0])  # deterministic: no augmentation
    assert sorted(out.keys + in_.keys) == list(range(len(dataset[1])))


def test_demo_trials_become_domainbed_trial_seeds():
    from sweeps import demo
    args = demo.sweep_args("data", "out", ["ZSCLIP"], {}, 1, trials=2)
    assert args[args.index("--n_trials") + 1] == "2"
