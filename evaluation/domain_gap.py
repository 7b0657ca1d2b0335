"""Measure the domain gap of finished DomainBed jobs with tllib (docs: docs/domainbed.md).

Domain gap of a finished DomainBed run or sweep, with tllib's analysis tools:

    python -m evaluation.domain_gap SWEEP_OR_JOB_DIR [...] [--images-per-domain 200] \
        [--device cuda|cpu] [--precision auto|bf16|fp16|fp32]
    python -m results.collect SWEEP_OR_JOB_DIR       # then: the table

For every finished job of a harness algorithm (a `done` file and DomainBed's `model.pkl`),
the method is rebuilt from its saved state (and, for the zero-shot baseline, the same CLIP
before any training, i.e. ZSCLIP with the job's backbone) on --device (default: cuda when
available, else cpu) at --precision (default auto: resolved for that device by
`choose_precision`), never the device or precision the job recorded. The features it
predicts with (`method.encode_image`; the moving average for CLIPood/AlignCLIP) are taken
of images of the training domains (source) and of the test domain (target), read with
CLIP's eval transform. Then, from thuml/Transfer-Learning-Library (third_party/, pinned):
- `tllib.utils.analysis.a_distance.calculate`: proxy A-distance 2 (1 - 2 err) of a
  linear domain classifier trained on 80 % of the features and tested on the rest
  (0: indistinguishable domains, 2: separable);
- `tllib.utils.analysis.tsne.visualize`: a t-SNE figure, source red, target blue.
Each job gets `domain_gap.json` (a record with the job's accuracies beside the two
distances and its run facts: the analysed job's protocol, stage "eval", the precision and
device it ran at) and `domain_gap_tsne.png` in its folder; `python -m results.collect`
turns the records into a table (results/kind_domain_gap.py).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from algorithms.core.hparams import PRECISIONS
from common import cli
from common.files import atomic_path, write_json_atomic
from common.records import in_domain_accuracy, read_domainbed_job
from common.run_facts import file_digest, run_facts
from evaluation.saved_jobs import create_method, method_state, method_values

RECORD = "domain_gap.json"
FIGURE = "domain_gap_tsne.png"


def tllib_analysis():
    try:
        from tllib.utils.analysis import a_distance, tsne
    except ImportError as e:
        raise SystemExit(f"domain_gap: tllib is not importable ({e}); run: python "
                         "third_party/install.py") from None
    return a_distance, tsne


def finished_jobs(roots) -> list[Path]:
    jobs = []
    for root in map(Path, roots):
        candidates = [root] if (root / "model.pkl").exists() else sorted(root.iterdir())
        jobs += [j for j in candidates if (j / "done").exists() and (j / "model.pkl").exists()]
    return jobs


def sample_images(environment, transform, limit: int, seed: int) -> torch.Tensor:
    indices = list(range(len(environment.samples)))
    random.Random(seed).shuffle(indices)
    return torch.stack([transform(environment.loader(environment.samples[i][0]))
                        for i in indices[:limit]])


@torch.no_grad()
def features(method, images: torch.Tensor, device: str, batch: int = 64) -> torch.Tensor:
    method.eval()
    return torch.cat([method.encode_image(images[i:i + batch].to(device)).float().cpu()
                      for i in range(0, len(images), batch)])


def accuracies(job: Path, test_env: int) -> dict:
    records, damage = read_domainbed_job(job, finished=True)
    if damage is not None:
        raise ValueError(f"{damage}: job left out as incomplete")
    last = records[-1]
    return {"test_acc": last.get(f"env{test_env}_in_acc"),
            "in_domain_acc": in_domain_accuracy(last), "step": last.get("step")}


def rebuild(saved: dict, device: str, precision: str):
    """The job's trained method, rebuilt on `device` at `precision` from model.pkl."""
    from algorithms.core.registry import get_method
    hparams = saved["model_hparams"]
    method_cls = get_method(saved["args"]["algorithm"])
    method = create_method(method_cls, hparams, method_values(method_cls, hparams, precision),
                           device)
    method.load_state_dict(method_state(saved))
    return method


def analyse(job: Path, images_per_domain: int, device: str, precision: str,
            zero_shot_cache: dict) -> dict:
    import domainbed.datasets
    from algorithms import backbone
    from algorithms.core.config import as_dict
    from algorithms.core.precision import choose_precision
    from algorithms.core.registry import get_method, methods
    a_distance, tsne = tllib_analysis()
    saved = backbone.load_checkpoint(job / "model.pkl", "cpu", "DomainBed model.pkl")
    args, hparams = saved["args"], dict(saved["model_hparams"])
    if args["algorithm"] not in methods():
        raise ValueError(f"{job}: {args['algorithm']} is not a harness algorithm")
    resolved = choose_precision(precision, device)
    test_env = args["test_envs"][0]
    dataset = vars(domainbed.datasets)[args["dataset"]](args["data_dir"], args["test_envs"],
                                                        dict(hparams))
    transform = backbone.clip_transform(backbone.image_size_of(hparams["clip_model"]), False)
    source = torch.cat([sample_images(env, transform, images_per_domain, i)
                        for i, env in enumerate(dataset.datasets) if i not in args["test_envs"]])
    target = sample_images(dataset.datasets[test_env], transform, images_per_domain, test_env)

    method = rebuild(saved, device, resolved)
    trained = (features(method, source, device), features(method, target, device))
    key = (hparams["clip_model"], hparams["clip_pretrained"], args["dataset"], test_env,
           images_per_domain)
    if key not in zero_shot_cache:
        zsclip = get_method("ZSCLIP").create(
            hparams["class_names"], {**{k: hparams[k] for k in ("clip_model", "clip_pretrained",
                                                                "templates")},
                                     "precision": resolved}, device=device)
        zero_shot = (features(zsclip, source, device), features(zsclip, target, device))
        torch.manual_seed(0)
        zero_shot_cache[key] = float(a_distance.calculate(*zero_shot, torch.device(device),
                                                          progress=False))
    torch.manual_seed(0)
    distance = float(a_distance.calculate(*trained, torch.device(device), progress=False))
    with atomic_path(job / FIGURE) as tmp:
        tsne.visualize(*trained, str(tmp))
    import matplotlib.pyplot as plt
    plt.close("all")
    job_facts = hparams.get("run") if isinstance(hparams.get("run"), dict) else {}
    domains = job_facts.get("domains")
    record = {"kind": "domain_gap", "algorithm": args["algorithm"], "dataset": args["dataset"],
              "test_env": test_env, "trial_seed": args["trial_seed"],
              "hparams_seed": args["hparams_seed"], "clip_model": hparams["clip_model"],
              "a_distance": distance, "a_distance_zero_shot": zero_shot_cache[key],
              "source_images": len(source), "target_images": len(target), "device": device,
              **accuracies(job, test_env),
              "run": run_facts(
                  protocol=job_facts.get("protocol") or "domainbed", stage="eval",
                  method=args["algorithm"], config=as_dict(method.cfg),
                  precision=resolved, backbone=hparams["clip_model"],
                  weights_digest=file_digest(job / "model.pkl"), dataset=args["dataset"],
                  domains=domains,
                  test_domains=[domains[t] for t in args["test_envs"]] if domains else None,
                  seeds={"trial_seed": args["trial_seed"], "hparams_seed": args["hparams_seed"]},
                  steps=job_facts.get("steps"))}
    write_json_atomic(job / RECORD, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.domain_gap",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="DomainBed sweep folders or job folders")
    parser.add_argument("--images-per-domain", type=int, default=200)
    parser.add_argument("--device", help="where the models run (default: cuda when "
                        "available, else cpu)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the models' precision (default auto: for the device)")
    args = parser.parse_args(argv)
    from algorithms.core.context import default_device
    from algorithms.core.precision import choose_precision, device_problem
    device = args.device or default_device()
    problem = device_problem(device, args.precision)
    if problem:
        print(f"domain_gap: error: {problem}", file=sys.stderr)
        return 2
    tllib_analysis()
    jobs = finished_jobs(args.dirs)
    if not jobs:
        print(f"domain_gap: no finished DomainBed job (done + model.pkl) under "
              f"{', '.join(args.dirs)}", file=sys.stderr)
        return 2
    cache, failed = {}, []
    for job in tqdm(jobs, desc="domain gap", unit="job"):
        try:
            analyse(job, args.images_per_domain, device, args.precision, cache)
        except (ValueError, OSError, KeyError) as e:
            failed.append(f"{job}: {cli.one_line(e)}")
            print(f"domain_gap: {failed[-1]}", file=sys.stderr)
    analysed = len(jobs) - len(failed)
    print(f"domain_gap: {analysed} job(s) analysed on {device} at "
          f"{choose_precision(args.precision, device)}; tables: python -m results.collect "
          f"{' '.join(args.dirs)}", file=sys.stderr)
    if failed:  # the last line says so
        print(f"domain_gap: error: {len(failed)} of {len(jobs)} job(s) not analysed; first: "
              f"{failed[0]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
