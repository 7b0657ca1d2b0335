"""WiSE-FT over finished DomainBed jobs: every alpha of a grid, without retraining.

    python -m evaluation.wise_ft --input_dir SWEEP_OR_JOB [--alphas 0 0.1 ... 1] \
        [--device cuda|cpu] [--precision auto|bf16|fp16|fp32] [--data_dir DIR]
    python -m results.collect SWEEP                     # then: the tables and the curve

For every finished job (`done`, DomainBed's `model.pkl`) of a harness method that trains
(CLIPFT, CLIPood, AlignCLIP, CLIPLP, ...), the method is rebuilt from the job's run facts
twice over: as built before training (the zero-shot endpoint) and from `model.pkl` (the
fine-tuned one); theta(alpha) (algorithms/wise_ft.py) is evaluated on the job's own
splits (train.py's in/out/uda splits of every environment, same seeds and fractions) at
each alpha. The result is a sibling job folder `<job>-WiSE-FT` in DomainBed's format: one
results.jsonl record per alpha, in alpha order (`step` is the alpha's index), with
`args.algorithm` `WiSE-FT(<source>)`, `args.source_algorithm`, `hparams.alpha` and the run
facts (`hparams.run`: method `WiSE-FT(<source>)`, stage "eval", the source job and the
sha256 of its model.pkl as `weights_digest`, `steps` the grid's length), then `done`.
The folder is filled under a hidden name and renamed whole; a finished one is skipped, so
a second call resumes. The collector and collect_results treat alpha as a hyperparameter
(each alpha a run of its own: common/records.py `alpha_runs`): training-domain validation
picks the alpha on the training domains' held-out images, the oracle on the test domain's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from algorithms.core.hparams import PRECISIONS
from common import cli
from common.files import staged_dir
from common.records import read_domainbed_job
from common.run_facts import file_digest, run_facts
from evaluation.saved_jobs import create_method, method_state, method_values

SUFFIX = "-WiSE-FT"
EVAL_BATCH = 64  # train.py's evaluation batch


def row_name(source: str) -> str:
    from algorithms.wise_ft import NAME
    return f"{NAME}({source})"


def output_dir(job: Path) -> Path:
    return job.parent / f"{job.name}{SUFFIX}"


def candidate_jobs(root: Path) -> list[Path]:
    """`root` when it is a job folder, else its job folders (not hidden, not our own)."""
    if any((root / name).exists() for name in ("results.jsonl", "model.pkl", "done")):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and not p.name.endswith(SUFFIX))


def source_method(job: Path):
    """The trained harness method class of a finished job, None for any other job
    (upstream's algorithms, training-free methods); InputError when the job cannot be
    read or lacks its model."""
    from algorithms.core.registry import methods
    records, damage = read_domainbed_job(job, finished=True)
    if damage is not None:
        raise cli.InputError(f"{damage.reason} ({damage.where()}): job left out as incomplete")
    method_cls = methods().get(records[-1]["args"]["algorithm"])
    if method_cls is None or not method_cls.trains:
        return None
    if not (job / "model.pkl").is_file():
        raise cli.InputError("finished but no model.pkl (a sweep run with "
                             "--skip_model_save keeps no model to interpolate)")
    return method_cls


def job_splits(args: dict, hparams: dict, data_dir: str | None):
    """[(name, split)] of train.py's evaluation splits (env<i>_in, env<i>_out,
    env<k>_uda) and the dataset, built as train.py builds them."""
    import domainbed.datasets
    from domainbed.lib import misc
    dataset_cls = vars(domainbed.datasets).get(args["dataset"])
    if dataset_cls is None:
        raise cli.InputError(f"unknown DomainBed dataset {args['dataset']!r}")
    dataset = dataset_cls(data_dir or args["data_dir"], args["test_envs"], dict(hparams))
    ins, outs, udas = [], [], []
    for i, environment in enumerate(dataset):
        out, in_ = misc.split_dataset(environment, int(len(environment) * args["holdout_fraction"]),
                                      misc.seed_hash(args["trial_seed"], i))
        if i in args["test_envs"]:
            uda, in_ = misc.split_dataset(in_, int(len(in_) * args["uda_holdout_fraction"]),
                                          misc.seed_hash(args["trial_seed"], i))
            if len(uda):
                udas.append(uda)
        ins.append(in_)
        outs.append(out)
    named = [(f"env{i}_in", s) for i, s in enumerate(ins)]
    named += [(f"env{i}_out", s) for i, s in enumerate(outs)]
    named += [(f"env{i}_uda", s) for i, s in enumerate(udas)]
    return named, dataset


def evaluate_job(job: Path, method_cls, alphas, device: str, precision: str,
                 data_dir: str | None = None) -> list[dict]:
    """One DomainBed record per alpha for the finished job `job`."""
    import torch
    from domainbed.lib import misc

    from algorithms import backbone
    from algorithms import wise_ft
    from algorithms.core.precision import choose_precision
    from common.run_facts import check_facts
    saved = backbone.load_checkpoint(job / "model.pkl", "cpu", "DomainBed model.pkl")
    args, hparams = dict(saved["args"]), dict(saved["model_hparams"])
    source = check_facts(hparams.get("run"), f"{job / 'model.pkl'}: model_hparams.run")
    resolved = choose_precision(precision, device)
    method = create_method(
        method_cls, hparams,
        wise_ft.zero_shot_values(method_cls, method_values(method_cls, hparams, resolved)),
        device)
    if method.weights_digest != source["weights_digest"]:
        raise cli.InputError(
            f"the zero-shot endpoint is not the CLIP the job started from (weights "
            f"{method.weights_digest} vs recorded {source['weights_digest']}): a randomly "
            "initialised CLIP (clip_pretrained '') cannot be rebuilt, nor a changed file")
    ensemble = wise_ft.WeightSpaceEnsemble(method, method_state(saved))
    splits, dataset = job_splits(args, hparams, data_dir)
    loaders = [(name, torch.utils.data.DataLoader(split, batch_size=EVAL_BATCH, shuffle=False,
                                                  num_workers=dataset.N_WORKERS))
               for name, split in splits]
    name = row_name(args["algorithm"])
    out = output_dir(job)
    records = []
    for step, alpha in enumerate(alphas):
        model = ensemble.at(alpha)
        accuracies = {f"{split}_acc": misc.accuracy(model, loader, None, device)
                      for split, loader in loaders}
        facts = run_facts(
            protocol=source["protocol"], stage="eval", method=name,
            config={"alpha": alpha, "alphas": list(alphas), "source_algorithm": args["algorithm"],
                    "source_job": job.name, "source_config": source["config"],
                    "source_steps": source["steps"]},
            precision=resolved, backbone=source["backbone"],
            weights_digest=file_digest(job / "model.pkl"), dataset=source["dataset"],
            domains=source["domains"], test_domains=source["test_domains"],
            seeds=source["seeds"], steps=len(alphas))
        records.append({
            "args": {**args, "algorithm": name, "source_algorithm": args["algorithm"],
                     "output_dir": str(out), "steps": len(alphas)},
            "hparams": {**hparams, "alpha": alpha, "precision": resolved, "run": facts},
            "step": step, **accuracies})
    return records


def write_job(job: Path, records: list[dict]) -> Path:
    """The sibling job folder, whole or not at all: results.jsonl, then `done`."""
    import json
    out = output_dir(job)
    with staged_dir(out, lambda final: (final / "done").exists()) as work:
        (work / "results.jsonl").write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        (work / "done").write_text("done\n")
    return out


def main(argv=None) -> int:
    from algorithms.wise_ft import DEFAULT_ALPHAS
    parser = argparse.ArgumentParser(prog="python -m evaluation.wise_ft",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True, help="a DomainBed sweep or job folder")
    parser.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS),
                        help="the grid (default 0, 0.1, ..., 1)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="default auto: for the device")
    parser.add_argument("--data_dir", help="the dataset root, when it moved since training "
                        "(default: the one each job recorded)")
    args = parser.parse_args(argv)
    from algorithms import wise_ft
    from algorithms.core.context import default_device
    from algorithms.core.precision import device_problem
    try:
        alphas = wise_ft.check_alphas(args.alphas)
    except ValueError as e:
        print(f"wise_ft: error: --alphas: {e}", file=sys.stderr)
        return 2
    device = args.device or default_device()
    problem = device_problem(device, args.precision)
    if problem:
        print(f"wise_ft: error: {problem}", file=sys.stderr)
        return 2
    root = Path(args.input_dir)
    if not root.is_dir():
        print(f"wise_ft: error: --input_dir {root}: no such folder", file=sys.stderr)
        return 2
    jobs = candidate_jobs(root)
    if jobs == [root] and not (root / "done").exists():
        print(f"wise_ft: error: {root}: job not finished (no `done`)", file=sys.stderr)
        return 2
    written, skipped, unfinished, failed = 0, 0, 0, []
    for job in jobs:
        if not (job / "done").exists():
            unfinished += 1
            continue
        try:
            method_cls = source_method(job)
            if method_cls is None:
                continue
            if (output_dir(job) / "done").exists():
                skipped += 1
                continue
            records = evaluate_job(job, method_cls, alphas, device, args.precision,
                                   args.data_dir)
            write_job(job, records)
            written += 1
        except (ValueError, OSError, KeyError) as e:
            failed.append(f"{job}: {cli.one_line(e)}")
            print(f"wise_ft: {failed[-1]}", file=sys.stderr)
    print(f"wise_ft: {written} job(s) evaluated at {len(alphas)} alphas on {device}, "
          f"{skipped} already done, {unfinished} unfinished left alone; tables: "
          f"python -m results.collect {root}", file=sys.stderr)
    if failed:  # the last line says so
        print(f"wise_ft: error: {len(failed)} job(s) not evaluated; first: {failed[0]}",
              file=sys.stderr)
        return 1
    if written + skipped == 0:
        print(f"wise_ft: error: no finished job of a trained harness method under {root}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
