"""Domain gap of a finished DomainBed run or sweep, with tllib's analysis tools:

    python -m results.domain_gap SWEEP_OR_JOB_DIR [...] [--images-per-domain 200]

For every finished job of a harness algorithm (a `done` file and DomainBed's `model.pkl`),
the model is rebuilt from its saved state (and, for the zero-shot baseline, the same CLIP
before any training, i.e. ZSCLIP with the job's backbone), and the features it predicts
with (`method.encode_image`; the moving average for CLIPood/AlignCLIP) are taken of images
of the training domains (source) and of the test domain (target), read with CLIP's eval
transform. Then, from thuml/Transfer-Learning-Library (third_party/, pinned):
- `tllib.utils.analysis.a_distance.calculate`: proxy A-distance 2 (1 - 2 err) of a
  linear domain classifier trained on 80 % of the features and tested on the rest
  (0: indistinguishable domains, 2: separable);
- `tllib.utils.analysis.tsne.visualize`: a t-SNE figure, source red, target blue.
Each job gets `domain_gap.json` (a record with the job's accuracies beside the two
distances) and `domain_gap_tsne.png` in its folder; `python -m results.collect` turns the
records into a table (results/kind_domain_gap.py), printed at the end.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from common import cli
from common.files import atomic_path, write_json_atomic
from results.records import read_domainbed_job

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
def features(method, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    method.eval()
    return torch.cat([method.encode_image(images[i:i + batch]).float().cpu()
                      for i in range(0, len(images), batch)])


def accuracies(job: Path, test_env: int) -> dict:
    from results.kind_domainbed import in_domain_accuracy
    records, damage = read_domainbed_job(job, finished=True)
    if damage is not None:
        raise ValueError(f"{damage}: job left out as incomplete")
    last = records[-1]
    return {"test_acc": last.get(f"env{test_env}_in_acc"),
            "in_domain_acc": in_domain_accuracy(last), "step": last.get("step")}


def analyse(job: Path, images_per_domain: int, zero_shot_cache: dict) -> dict:
    import domainbed.algorithms
    import domainbed.datasets
    from algorithms import backbone
    from algorithms.core.registry import get_method, methods
    a_distance, tsne = tllib_analysis()
    saved = backbone.load_checkpoint(job / "model.pkl", "cpu", "DomainBed model.pkl")
    args, hparams = saved["args"], dict(saved["model_hparams"])
    if args["algorithm"] not in methods():
        raise ValueError(f"{job}: {args['algorithm']} is not a harness algorithm")
    test_env = args["test_envs"][0]
    dataset = vars(domainbed.datasets)[args["dataset"]](args["data_dir"], args["test_envs"],
                                                        dict(hparams))
    transform = backbone.clip_transform(backbone.image_size_of(hparams["clip_model"]), False)
    source = torch.cat([sample_images(env, transform, images_per_domain, i)
                        for i, env in enumerate(dataset.datasets) if i not in args["test_envs"]])
    target = sample_images(dataset.datasets[test_env], transform, images_per_domain, test_env)

    algorithm = domainbed.algorithms.get_algorithm_class(args["algorithm"])(
        saved["model_input_shape"], saved["model_num_classes"], saved["model_num_domains"],
        hparams)
    algorithm.load_state_dict(saved["model_dict"])
    trained = (features(algorithm.method, source), features(algorithm.method, target))
    key = (hparams["clip_model"], hparams["clip_pretrained"], args["dataset"], test_env,
           images_per_domain)
    if key not in zero_shot_cache:
        zsclip = get_method("ZSCLIP")(hparams["class_names"], {**get_method("ZSCLIP").default_hparams(),
                                      **{k: hparams[k] for k in ("clip_model", "clip_pretrained",
                                                                 "templates")}}, device="cpu")
        zero_shot = (features(zsclip, source), features(zsclip, target))
        torch.manual_seed(0)
        zero_shot_cache[key] = float(a_distance.calculate(*zero_shot, torch.device("cpu"),
                                                          progress=False))
    torch.manual_seed(0)
    distance = float(a_distance.calculate(*trained, torch.device("cpu"), progress=False))
    with atomic_path(job / FIGURE) as tmp:
        tsne.visualize(*trained, str(tmp))
    import matplotlib.pyplot as plt
    plt.close("all")
    record = {"kind": "domain_gap", "algorithm": args["algorithm"], "dataset": args["dataset"],
              "test_env": test_env, "trial_seed": args["trial_seed"],
              "hparams_seed": args["hparams_seed"], "clip_model": hparams["clip_model"],
              "a_distance": distance, "a_distance_zero_shot": zero_shot_cache[key],
              "source_images": len(source), "target_images": len(target),
              **accuracies(job, test_env)}
    write_json_atomic(job / RECORD, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m results.domain_gap",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="DomainBed sweep folders or job folders")
    parser.add_argument("--images-per-domain", type=int, default=200)
    parser.add_argument("--out", help="tables folder (default: <first dir>/tables)")
    args = parser.parse_args(argv)
    tllib_analysis()
    jobs = finished_jobs(args.dirs)
    if not jobs:
        print(f"domain_gap: no finished DomainBed job (done + model.pkl) under "
              f"{', '.join(args.dirs)}", file=sys.stderr)
        return 2
    cache, failed = {}, []
    for job in tqdm(jobs, desc="domain gap", unit="job"):
        try:
            analyse(job, args.images_per_domain, cache)
        except (ValueError, OSError, KeyError) as e:
            failed.append(f"{job}: {cli.one_line(e)}")
            print(f"domain_gap: {failed[-1]}", file=sys.stderr)
    from results import collect
    collect.main([*args.dirs, *(["--out", args.out] if args.out else []), "--no-figures"])
    if failed:  # the last line says so, after the collector's output
        print(f"domain_gap: error: {len(failed)} of {len(jobs)} job(s) not analysed; first: "
              f"{failed[0]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
