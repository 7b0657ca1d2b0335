"""DomainBed's own sweep, training script and collect_results, run unchanged as
subprocesses: registration must reach every process through the installed hook."""
import json

from sweeps import demo
from tests.conftest import PY, TINY, job_records, needs_domainbed, run, train_domainbed

pytestmark = needs_domainbed


def test_sweep_launch_then_collect_results(small_world, tmp_path):
    out = tmp_path / "sweep"
    hparams = {k: TINY[k] for k in ("clip_model", "clip_pretrained")}
    args = demo.sweep_args(small_world["domainbed_root"], out, ["ZSCLIP"], hparams, steps=1)
    assert args[args.index("--command_launcher") + 1] == "local_parallel"
    launched = run([PY, "-m", "domainbed.scripts.sweep", "launch", *args], cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr[-2000:]
    jobs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(jobs) == 4 and all((j / "done").exists() for j in jobs)
    assert demo.count_done(out, ["ZSCLIP"]) == 4 and demo.count_done(out, ["CALIP"]) == 0
    assert not demo.has_incomplete_jobs(out)
    record = json.loads((jobs[0] / "results.jsonl").read_text().splitlines()[-1])
    assert record["args"]["algorithm"] == "ZSCLIP"
    assert record["hparams"]["class_names"][:2] == ["arrow", "circle"]
    assert 0.0 <= record["env0_in_acc"] <= 1.0
    done_times = [(j / "done").stat().st_mtime for j in jobs]

    again = run([PY, "-m", "domainbed.scripts.sweep", "launch", *args], cwd=tmp_path)
    assert again.returncode == 0 and "Launched 0 jobs" in again.stdout
    assert [(j / "done").stat().st_mtime for j in jobs] == done_times

    collected = run([PY, "-m", "domainbed.scripts.collect_results", "--input_dir", str(out)],
                    cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr[-2000:]
    rows = [line for line in collected.stdout.splitlines() if line.startswith("ZSCLIP")]
    assert rows, collected.stdout
    iid_row = rows[0].split()
    assert len([c for c in iid_row if c.replace(".", "").isdigit()]) >= 5  # 4 domains + avg


def test_train_script_rejects_too_small_training_split(small_world, tmp_path):
    result = train_domainbed("ZSCLIP", small_world, tmp_path / "job", {**TINY, "batch_size": 500},
                             "--steps", "1", timeout=300)
    assert result.returncode != 0
    assert "fewer than batch_size=500" in result.stdout + result.stderr  # train.py tees stderr
    assert not (tmp_path / "job" / "done").exists()


def test_alignclip_job_trains_and_saves_only_the_image_encoder(small_world, tmp_path):
    import torch
    out = tmp_path / "job"
    hparams = {**TINY, "batch_size": 8}  # the schedule spans the job's --steps
    result = train_domainbed("AlignCLIP", small_world, out, hparams,
                             "--test_envs", "1", "--steps", "3", "--checkpoint_freq", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = job_records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert {"loss", "loss_cls", "loss_aal", "loss_last"} <= set(records[-1])
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    prefixes = {k.split(".")[1] for k in saved}
    assert prefixes == {"visual", "bma"}, prefixes


def test_full_random_search_sweep_is_laid_out(small_world, tmp_path):
    """--n_hparams 20 --n_trials 3 with DomainBed's dummy launcher: every job is made,
    with distinct random hyperparameters per hparams_seed."""
    result = run([PY, "-m", "domainbed.scripts.sweep", "launch", "--datasets", "CLIPWorld",
                  "--algorithms", "AlignCLIP", "CLIPood", "--data_dir", small_world["domainbed_root"],
                  "--output_dir", str(tmp_path / "sweep"), "--command_launcher", "dummy",
                  "--n_hparams", "20", "--n_trials", "3", "--skip_confirmation"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    commands = [l for l in result.stdout.splitlines() if "domainbed.scripts.train" in l]
    assert len(commands) == 2 * 3 * 20 * (4 + 6)  # algorithms x trials x hparams x test envs
    from domainbed import hparams_registry
    from domainbed.lib import misc
    draws = {json.dumps(hparams_registry.random_hparams("AlignCLIP", "CLIPWorld",
                                                        misc.seed_hash(h, 0)), sort_keys=True)
             for h in range(1, 21)}
    assert len(draws) == 20
