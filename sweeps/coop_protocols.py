r"""Run a CoOp protocol for several trainers, then make its tables (docs: docs/coop.md).

CoOp's prompt-learning protocols for every trainer train_coop.py runs (the harness's,
CoOp's own CoOp, CoCoOp, ZeroshotCLIP, and MaPLe, IVLP, VPT and PromptSRC from their own
code), then the tables (results/collect.py).

    python -m sweeps.coop_protocols base2new --trainer CoOp CoCoOp AlignCLIP ZSCLIP \
        --root DATA --output output --openai-clip-dir ~/weights
    python -m sweeps.coop_protocols cross_dataset --trainer CoCoOp --root DATA --output output
    python -m sweeps.coop_protocols domain_generalization --trainer CoCoOp --root DATA \
        --output output

- base2new: per dataset and seed, train on the base half of the classes (16 shots) and
  test on base; then evaluate that model on the new half (CoOp's scripts/cocoop/
  base2new_{train,test}.sh). Runs: <output>/base2new/{train_base,test_new}/<dataset>/
  shots_<K>/<trainer>/<config>/seed<S>.
- cross_dataset: train on ImageNet (16 shots, all classes), evaluate on the other ten
  (xd_{train,test}.sh): <output>/imagenet/<trainer>/<config>_<K>shots/seed<S> and
  <output>/evaluation/<trainer>/<config>_<K>shots/<dataset>/seed<S>.
- domain_generalization: the same ImageNet model (reused if cross_dataset made it)
  evaluated on ImageNet-V2, -Sketch, -A and -R.

Per-trainer configs, evaluation-only trainers and step budgets are data, in the recipe
book (recipes/recipes.yaml, `coop_protocols`). Each run's record names its protocol and
stage (HARNESS.PROTOCOL / HARNESS.STAGE: base2new base/new, cross_dataset and
domain_generalization source/target). A run is finished when its results.json exists; a
rerun skips finished runs and starts an unfinished one afresh (its folder is removed
first). A missing or incomplete dataset is one line naming what is missing and where it
was looked for, and its runs are skipped.

--launcher slurm submits the protocol as one Slurm job array through submitit (common/
slurm.py: --slurm-* flags, CLIPBENCH_SLURM_* variables); each task runs one model and
the runs that evaluate it, in order; finished runs are skipped as above.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import recipes
from algorithms.core import registry
from common import cli, env, slurm
from common.paths import REPO, THIRD_PARTY, TRAINER_CONFIGS
from trainers.coop_runner import UPSTREAM_TRAINERS, upstream_dir

COOP_DIR = env.coop_dir()
SETTINGS_FILE = recipes.BOOK
HARNESS_DEFAULT_CONFIG = TRAINER_CONFIGS / "backbones" / "vit_b16.yaml"
TRAIN_COOP = REPO / "train_coop.py"
OPENAI_CLIP_DIR_ENV = env.OPENAI_CLIP_DIR  # read by trainers/upstream_patches.py
# CoOp's own trainers: they load OpenAI CLIP through CoOp's vendored `clip`
COOP_TRAINERS = ("CoOp", "CoCoOp", "ZeroshotCLIP", "ZeroshotCLIP2")
# every trainer that loads OpenAI CLIP through an upstream's vendored `clip`
OPENAI_CLIP_TRAINERS = COOP_TRAINERS + tuple(t for names in UPSTREAM_TRAINERS.values()
                                             for t in names)
# "<prefix>:<path>" in the recipe book: <path> under that checkout's configs/trainers/
CONFIG_PREFIXES = {"coop": COOP_DIR, "maple": THIRD_PARTY / "multimodal-prompt-learning",
                   "promptsrc": THIRD_PARTY / "PromptSRC"}
PROTOCOLS = ("base2new", "cross_dataset", "domain_generalization")
UNSEEN_CLASS_PROTOCOLS = ("base2new", "cross_dataset")  # evaluate classes never trained on
# a run's stage -> what its record says it is (common/run_facts.py)
RECORD_STAGES = {"train_base": "base", "test_new": "new", "source": "source", "target": "target"}


# --- datasets: CoOp's DATASETS.md layout ---------------------------------------------

@dataclass(frozen=True)
class Dataset:
    """One CoOp dataset: its config name (configs/datasets/<key>.yaml), DATASET.NAME,
    folder under --root and what CoOp's dataset class reads there."""
    key: str
    name: str
    folder: str
    images: str                  # image folder ("" = the dataset folder itself)
    split: str = ""              # fixed split file: {"train", "val", "test"}: [path, label, class]
    files: tuple = ()            # other files read
    dirs: tuple = ()             # other folders read
    count_file: str = ""         # one class per line, where there is no split file
    config_dir: Path = COOP_DIR / "configs" / "datasets"  # holds <key>.yaml

    @property
    def config_file(self) -> Path:
        return self.config_dir / f"{self.key}.yaml"

    def check(self, root) -> tuple[str | None, dict]:
        """(None, info) when present, else (the one line saying what is missing, {}).
        info: "train_counts" {label: images} from the split file, or "classes"."""
        folder = Path(root) / self.folder
        if not folder.is_dir():
            return f"{self.name}: missing {self.folder}/ (looked in {Path(root)})", {}
        missing = [f"{d}/" for d in (self.images, *self.dirs) if d and not (folder / d).is_dir()]
        missing += [f for f in (self.split, *self.files) if f and not (folder / f).is_file()]
        if missing:
            return f"{self.name}: missing {', '.join(missing)} (looked in {folder})", {}
        if not self.split:
            count = folder / self.count_file if self.count_file else None
            classes = sum(1 for line in open(count) if line.strip()) if count else None
            return None, {"classes": classes}
        try:
            with open(folder / self.split) as f:
                split = json.load(f)
            items = [item for part in ("train", "val", "test") for item in split[part]]
            counts = {}
            for path, label, *_ in split["train"]:
                counts[int(label)] = counts.get(int(label), 0) + 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{self.name}: unreadable {self.split} ({type(e).__name__}: {e}) " \
                   f"(looked in {folder})", {}
        prefix = folder / self.images
        absent = [path for path, *_ in items if not (prefix / path).is_file()]
        if absent:
            first = Path(self.images) / absent[0]
            return (f"{self.name}: missing {len(absent)} of {len(items)} images listed in "
                    f"{self.split} (first: {first}) (looked in {folder})"), {}
        return None, {"train_counts": counts}


def _split(name):
    return f"split_zhou_{name}.json"


DATASETS = {d.key: d for d in (
    Dataset("imagenet", "ImageNet", "imagenet", "images", files=("classnames.txt",),
            dirs=("images/train", "images/val"), count_file="classnames.txt"),
    Dataset("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
            _split("Caltech101")),
    Dataset("oxford_pets", "OxfordPets", "oxford_pets", "images", _split("OxfordPets")),
    Dataset("stanford_cars", "StanfordCars", "stanford_cars", "", _split("StanfordCars"),
            dirs=("cars_train", "cars_test")),
    Dataset("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", _split("OxfordFlowers")),
    Dataset("food101", "Food101", "food-101", "images", _split("Food101")),
    Dataset("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images",
            files=("variants.txt", "images_variant_train.txt", "images_variant_val.txt",
                   "images_variant_test.txt"), count_file="variants.txt"),
    Dataset("sun397", "SUN397", "sun397", "SUN397", _split("SUN397")),
    Dataset("dtd", "DescribableTextures", "dtd", "images", _split("DescribableTextures")),
    Dataset("eurosat", "EuroSAT", "eurosat", "2750", _split("EuroSAT")),
    Dataset("ucf101", "UCF101", "ucf101", "UCF-101-midframes", _split("UCF101")),
    Dataset("imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
            files=("classnames.txt",)),
    Dataset("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images",
            files=("classnames.txt",)),
    Dataset("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a",
            files=("classnames.txt",)),
    Dataset("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r",
            files=("classnames.txt",)),
    # the generated world (python -m clipworld.generate --root R: its datasets are under R/coop)
    Dataset("clip_world", "CLIPWorld", "clip_world", "images", "split_clip_world.json",
            config_dir=TRAINER_CONFIGS / "datasets"),
)}
SOURCE = "imagenet"
BASE2NEW = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
TARGETS = {"base2new": BASE2NEW,
           "cross_dataset": tuple(d for d in BASE2NEW if d != SOURCE),
           "domain_generalization": ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")}


def dataset_by_name(name: str) -> Dataset:
    """A dataset by CoOp's config name (oxford_pets) or DATASET.NAME (OxfordPets)."""
    for d in DATASETS.values():
        if name.lower() in (d.key, d.name.lower()):
            return d
    raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")


def training_images(info: dict, shots: int, subsample: str) -> int | None:
    """How many images a run trains on: `shots` per class of the subsample (CoOp's
    subsample_classes: base = the first ceil(n/2) labels), fewer where a class has fewer."""
    counts = info.get("train_counts")
    if counts:
        labels = sorted(counts)
        m = math.ceil(len(labels) / 2)
        labels = {"base": labels[:m], "new": labels[m:]}.get(subsample, labels)
        return sum(counts[c] if shots <= 0 else min(shots, counts[c]) for c in labels)
    classes = info.get("classes")
    if not classes or shots <= 0:
        return None
    return shots * (math.ceil(classes / 2) if subsample == "base" else classes)


# --- per-trainer settings (recipes/recipes.yaml, coop_protocols) ----------------------

@dataclass
class Settings:
    trainer: str
    config: Path
    config_by_dataset: dict = field(default_factory=dict)
    train: bool = True
    reference_steps: dict = field(default_factory=dict)
    opts_by_dataset: dict = field(default_factory=dict)
    opts: list = field(default_factory=list)
    source_config: Path | None = None  # cross_dataset's and DG's ImageNet model, if another

    def config_for(self, dataset_key: str) -> Path:
        return self.config_by_dataset.get(dataset_key, self.config)

    def source_config_for(self) -> Path:
        """The config of the ImageNet model that cross_dataset and domain_generalization
        train and evaluate."""
        return self.source_config or self.config_for(SOURCE)


def config_path(spec: str) -> Path:
    prefix, _, rest = spec.partition(":")
    if rest and prefix in CONFIG_PREFIXES:
        return CONFIG_PREFIXES[prefix] / "configs" / "trainers" / rest
    return Path(spec) if Path(spec).is_absolute() else REPO / spec


def load_settings(trainer: str, config_file=None, path=SETTINGS_FILE) -> Settings:
    """The protocol settings of a trainer; `config_file` (--config-file) replaces its
    configs. The harness's trainers default to trainers/configs/backbones/vit_b16.yaml and
    train when their method declares `trains`; any other trainer needs an entry."""
    entries = recipes.coop_protocols(Path(path))
    entry = entries.get(trainer) or {}
    harness = registry.methods().get(trainer)
    if not entry and harness is None and config_file is None:
        raise ValueError(f"{trainer}: not a harness trainer and no settings in "
                         f"{Path(path).relative_to(REPO)} (coop_protocols): pass --config-file (known: "
                         f"{', '.join(sorted(set(registry.methods()) | set(entries)))})")
    config = entry.get("config") or str(HARNESS_DEFAULT_CONFIG)
    train = entry.get("train", harness.trains if harness is not None else True)
    by_dataset = entry.get("config_by_dataset") or {}
    settings = Settings(trainer, config_path(config),
                        {k: config_path(v) for k, v in by_dataset.items()},
                        bool(train), dict(entry.get("reference_steps") or {}),
                        {k: [str(o) for o in v]
                         for k, v in (entry.get("opts_by_dataset") or {}).items()},
                        [str(o) for o in entry.get("opts") or []],
                        config_path(entry["source_config"]) if entry.get("source_config") else None)
    if config_file is not None:
        settings.config, settings.config_by_dataset = Path(config_file).resolve(), {}
        settings.source_config = None
    return settings


def yacs_value(value):
    """An opt's value as yacs reads it from the command line (a Python literal, else the
    string)."""
    try:
        return ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return str(value)


def check_method_opts(trainer: str, opts) -> None:
    """The opts that set a harness method's TRAINER.<NAME>.<KEY>, checked as its config
    is built (algorithms/core/config.py): an unknown key or a value of another type is
    one line before anything runs."""
    method_cls = registry.methods().get(trainer)
    if method_cls is None:
        return
    from algorithms.core.config import check_values
    prefix = f"TRAINER.{trainer.upper()}."
    values = {key[len(prefix):].lower(): yacs_value(value)
              for key, value in zip(opts[::2], opts[1::2]) if str(key).startswith(prefix)}
    check_values(method_cls, values, f"--opts for {trainer}")


def read_config(path: Path) -> dict:
    return cli.read_yaml_mapping(path, "trainer config")


def config_value(config: dict, key: str, opts, default=None):
    """A yacs key's value: the last `opts` pair that sets it, else the YAML's, else default."""
    pairs = dict(zip(opts[::2], opts[1::2]))
    if key in pairs:
        return yaml.safe_load(str(pairs[key]))
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def max_epoch_opts(settings: Settings, dataset: Dataset, info: dict, shots: int, subsample: str,
                   config: dict, user_opts) -> tuple[list, str]:
    """OPTIM.MAX_EPOCH giving the reference's number of optimisation steps (Dassl drops
    the last incomplete batch), and a note saying how it was derived; nothing when the
    trainer has no reference budget for the dataset or the command line sets it."""
    steps = settings.reference_steps.get(dataset.key)
    if not steps or not settings.train or "OPTIM.MAX_EPOCH" in user_opts[::2]:
        return [], ""
    batch = int(config_value(config, "DATALOADER.TRAIN_X.BATCH_SIZE", user_opts, 32))
    images = training_images(info, shots, subsample)
    if images is None:
        return [], (f"{dataset.name}: training-set size unknown; the config's "
                    "OPTIM.MAX_EPOCH is used")
    batches = max(1, images // batch)  # one (short) batch when images < batch
    epochs = math.ceil(steps / batches)
    return (["OPTIM.MAX_EPOCH", str(epochs)],
            f"OPTIM.MAX_EPOCH {epochs} = {steps} reference steps / {batches} batches of {batch} "
            f"({images} images)")


# --- runs -----------------------------------------------------------------------------

@dataclass
class Run:
    trainer: str
    dataset: Dataset
    seed: int
    stage: str              # train_base | test_new | source | target
    out_dir: Path
    flags: list             # train_coop.py options (before the yacs opts)
    opts: list              # yacs KEY VALUE pairs
    source: "Run | None" = None  # the run whose model this one evaluates
    note: str = ""

    def label(self) -> str:
        return f"{self.trainer} {self.dataset.name} seed {self.seed} {self.stage}"


def is_finished(run_dir: Path) -> bool:
    """A run is finished when its results.json (written after its test) is a record."""
    try:
        with open(Path(run_dir) / "results.json") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "metrics" in record


def last_epoch(run_dir: Path) -> int | None:
    """The epoch of a run's last checkpoint (<run>/<model name>/model.pth.tar-<epoch>),
    what CoOp's scripts pass as --load-epoch; None when it saved none."""
    epochs = [int(p.name.rsplit("-", 1)[1]) for p in Path(run_dir).glob("*/model.pth.tar-*")
              if p.name.rsplit("-", 1)[1].isdigit()]
    return max(epochs) if epochs else None


def base_flags(root, trainer, seed, dataset: Dataset, config: Path, out_dir: Path) -> list:
    return ["--root", str(root), "--seed", str(seed), "--trainer", trainer,
            "--dataset-config-file", str(dataset.config_file),
            "--config-file", str(config), "--output-dir", str(out_dir)]


def plan(protocol, settings_list, datasets, infos, seeds, shots, root, output,
         user_opts) -> list[Run]:
    """Every run of the protocol, in order (a model before what evaluates it)."""
    output, runs = Path(output), []

    def make(s, dataset, seed, stage, config, out_dir, opts, evaluates=None, note=""):
        flags = base_flags(root, s.trainer, seed, dataset, config, out_dir)
        if stage in ("test_new", "target") or not s.train:
            flags.append("--eval-only")
        opts = [*opts, *s.opts, *s.opts_by_dataset.get(dataset.key, []), *user_opts,
                "HARNESS.PROTOCOL", protocol, "HARNESS.STAGE", RECORD_STAGES[stage]]
        return Run(s.trainer, dataset, seed, stage, out_dir, flags, opts,
                   evaluates if s.train else None, note)

    if protocol == "base2new":
        for dataset in datasets:
            for s in settings_list:
                config = s.config_for(dataset.key)
                epochs, note = max_epoch_opts(s, dataset, infos[dataset.key], shots, "base",
                                              read_config(config), [*s.opts, *user_opts])
                for seed in seeds:
                    common = Path(dataset.key, f"shots_{shots}", s.trainer, config.stem,
                                  f"seed{seed}")
                    few = ["DATASET.NUM_SHOTS", str(shots), "DATASET.SUBSAMPLE_CLASSES"]
                    train = make(s, dataset, seed, "train_base", config,
                                 output / "base2new" / "train_base" / common,
                                 [*few, "base", *epochs], note=note)
                    runs += [train, make(s, dataset, seed, "test_new", config,
                                         output / "base2new" / "test_new" / common,
                                         [*few, "new"], evaluates=train)]
        return runs
    imagenet = DATASETS[SOURCE]
    for s in settings_list:
        config = s.source_config_for()  # the ImageNet model's config, for its targets too
        tag = f"{config.stem}_{shots}shots"
        epochs, note = max_epoch_opts(s, imagenet, infos.get(SOURCE, {}), shots, "all",
                                      read_config(config), [*s.opts, *user_opts])
        for seed in seeds:
            train = make(s, imagenet, seed, "source", config,
                         output / SOURCE / s.trainer / tag / f"seed{seed}",
                         ["DATASET.NUM_SHOTS", str(shots), *epochs], note=note)
            runs.append(train)
            runs += [make(s, dataset, seed, "target", config,
                          output / "evaluation" / s.trainer / tag / dataset.key / f"seed{seed}",
                          [], evaluates=train) for dataset in datasets]
    return runs


def table_dirs(protocol, output, datasets) -> list[Path]:
    """The folders whose records make the protocol's tables."""
    output = Path(output)
    if protocol == "base2new":
        dirs = [output / "base2new"]
    else:
        dirs = [output / SOURCE] + sorted(p for d in datasets
                                          for p in output.glob(f"evaluation/*/*/{d.key}"))
    return [d for d in dirs if d.is_dir()]


# --- running --------------------------------------------------------------------------

def command(run: Run) -> list[str]:
    """train_coop.py's command line; an evaluation loads the last epoch of its model."""
    flags = list(run.flags)
    if run.source is not None:
        flags += ["--model-dir", str(run.source.out_dir)]
        epoch = last_epoch(run.source.out_dir)
        if epoch is not None:
            flags += ["--load-epoch", str(epoch)]
        elif not is_finished(run.source.out_dir):  # a dry run: not trained yet
            flags += ["--load-epoch", "<last epoch>"]
    return [sys.executable, str(TRAIN_COOP), *flags, *run.opts]


def accuracy(run_dir: Path) -> str:
    try:
        with open(Path(run_dir) / "results.json") as f:
            return f"accuracy {json.load(f)['metrics']['accuracy']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no accuracy in results.json"


def execute(runs, environment, verbose=False) -> dict:
    """Run what is not finished, in order. Returns counts by outcome."""
    todo = [r for r in runs if not is_finished(r.out_dir)]
    print(f"{len(runs)} runs: {len(runs) - len(todo)} finished (skipped), {len(todo)} to run")
    outcome = {"finished": len(runs) - len(todo), "done": 0, "failed": 0, "blocked": 0}
    for i, run in enumerate(todo, start=1):
        head = f"[{i}/{len(todo)}] {run.label()}"
        if run.source is not None and not is_finished(run.source.out_dir):
            print(f"{head}: skipped, the model it evaluates did not finish ({run.source.out_dir})")
            outcome["blocked"] += 1
            continue
        if run.out_dir.exists():
            print(f"{head}: removing an unfinished run at {run.out_dir}")
            shutil.rmtree(run.out_dir)
        if run.note:
            print(f"{head}: {run.note}")
        cmd = command(run)
        if verbose:
            print("$ " + shlex.join(cmd), flush=True)
        start = time.time()
        result = subprocess.run(cmd, cwd=REPO, env=environment, text=True,
                                **({} if verbose else {"capture_output": True}))
        took = time.time() - start
        if result.returncode == 0 and is_finished(run.out_dir):
            print(f"{head}: {accuracy(run.out_dir)} ({took:.0f} s)", flush=True)
            outcome["done"] += 1
            continue
        outcome["failed"] += 1
        lines = [] if verbose else (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = lines[-1:]
        why = f"exit {result.returncode}" if result.returncode else "no results.json written"
        print(f"{head}: failed ({why}){': ' + tail[0] if tail else ''}; "
              f"log: {run.out_dir / 'log.txt'}", flush=True)
    return outcome


def chains(runs) -> list[list[Run]]:
    """The runs grouped as they can run apart: a model, then every run that evaluates
    it (in plan order); a run that evaluates no model alone."""
    groups = {}
    for run in runs:
        groups.setdefault(id(run.source if run.source is not None else run), []).append(run)
    return list(groups.values())


def run_chain(runs, overrides) -> dict:
    """One Slurm array task: execute() on this node, this job's environment plus the
    protocol's variables; an unfinished run fails the task."""
    outcome = execute(runs, dict(os.environ, **overrides), verbose=True)
    if outcome["failed"] or outcome["blocked"]:
        raise RuntimeError(f"{runs[0].label()}: {outcome['failed']} run(s) failed, "
                           f"{outcome['blocked']} waiting on a failed model")
    return outcome


def execute_slurm(protocol, runs, overrides, options, output) -> dict:
    """The unfinished chains as one array (one task per chain). Returns execute()'s
    counts, read from the run folders once the array is over (when waited for)."""
    todo = [c for c in chains(runs) if not all(is_finished(r.out_dir) for r in c)]
    finished = sum(is_finished(r.out_dir) for r in runs)
    print(f"{len(runs)} runs: {finished} finished (skipped), {len(runs) - finished} to run in "
          f"{len(todo)} array task(s)", flush=True)
    outcome = {"finished": finished, "done": 0, "failed": 0, "blocked": 0, "submitted": 0}
    if not todo:
        return outcome
    result = slurm.submit(run_chain, [(chain, overrides) for chain in todo],
                          [chain[0].label() + (f" (+{len(chain) - 1} evaluating it)"
                                               if len(chain) > 1 else "") for chain in todo],
                          options,
                          Path(output) / "slurm_logs" / protocol, f"clipbench-{protocol}")
    outcome["submitted"] = result.submitted
    if options.wait:
        now = sum(is_finished(r.out_dir) for r in runs)
        outcome["done"], outcome["failed"] = now - finished, len(runs) - now
    return outcome


def make_tables(protocol, output, datasets, figures=True) -> int:
    dirs = table_dirs(protocol, output, datasets)
    if not dirs:
        print("no results yet: no table", file=sys.stderr)
        return 1
    try:
        from results import collect
    except ImportError as e:  # the collector is another part of the harness
        print(f"results.collect is not available ({e}): no table; the records are under "
              f"{output}", file=sys.stderr)
        return 1
    argv = [*map(str, dirs), "--out", str(Path(output) / "tables" / protocol)]
    return collect.main(argv + ([] if figures else ["--no-figures"]))


# --- command line ---------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m sweeps.coop_protocols",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("--trainer", nargs="+", required=True,
                        help="trainers (the harness's and CoOp's CoOp, CoCoOp, ZeroshotCLIP)")
    parser.add_argument("--config-file", nargs="+",
                        help="trainer config(s): one for all trainers or one per trainer "
                             "(default: recipes/recipes.yaml, coop_protocols)")
    parser.add_argument("--root", required=True, help="datasets in CoOp's DATASETS.md layout")
    parser.add_argument("--output", default="output", help="runs and tables (default: output)")
    parser.add_argument("--datasets", nargs="+",
                        help="datasets (CoOp config names or DATASET.NAME); for cross_dataset and "
                             "domain_generalization the targets (the source is ImageNet)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--openai-clip-dir",
                        help=f"folder with OpenAI CLIP weights named as OpenAI's downloads "
                             f"(ViT-B-16.pt, RN50.pt, ...) for CoOp's trainers (sets "
                             f"{OPENAI_CLIP_DIR_ENV}); default: CoOp downloads to ~/.cache/clip")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="yacs opts added to every run (after the protocol's)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--verbose", action="store_true", help="show each run's own output")
    parser.add_argument("--no-figures", action="store_true", help="tables without PNG figures")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: one run after another here (default); slurm: one job "
                             "array through submitit (options below)")
    slurm.add_arguments(parser)
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error("--opts takes KEY VALUE pairs")
    if args.config_file and len(args.config_file) not in (1, len(args.trainer)):
        parser.error("--config-file: give one for all trainers or one per trainer")
    flags = slurm.given_flags(args)
    if flags and args.launcher != "slurm":
        parser.error(f"{flags[0]}: only with --launcher slurm")
    return args


def openai_weights_problem(settings: Settings, datasets, clip_dir, opts) -> str | None:
    """For CoOp's own trainers given a weights folder: the file CoOp will ask for
    (named as OpenAI's download: MODEL.BACKBONE.NAME ViT-B/16 -> ViT-B-16.pt)."""
    if settings.trainer not in OPENAI_CLIP_TRAINERS or not clip_dir:
        return None
    for dataset in datasets:
        config = read_config(settings.config_for(dataset.key))
        backbone = str(config_value(config, "MODEL.BACKBONE.NAME", opts, ""))
        path = Path(clip_dir).expanduser() / f"{backbone.replace('/', '-')}.pt"
        if not path.is_file():
            return f"{settings.trainer}: missing OpenAI CLIP {backbone} weights (looked for {path})"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    root, output = Path(args.root).resolve(), Path(args.output).resolve()
    try:
        slurm_options = slurm.options_from_args(args) if args.launcher == "slurm" else None
    except slurm.SlurmError as e:
        print(f"coop_protocols: error: {e}", file=sys.stderr)
        return 2
    if not (COOP_DIR / "train.py").is_file():
        print(f"coop_protocols: error: CoOp not found at {COOP_DIR} "
              "(run: python third_party/install.py)", file=sys.stderr)
        return 2
    try:
        wanted = [dataset_by_name(d) for d in (args.datasets or TARGETS[args.protocol])]
        configs = args.config_file or [None]
        settings_list = [load_settings(t, configs[i] if len(configs) > 1 else configs[0])
                         for i, t in enumerate(args.trainer)]
    except ValueError as e:
        print(f"coop_protocols: error: {e}", file=sys.stderr)
        return 2
    for s in list(settings_list):  # MaPLe's, PromptSRC's own code: one line when absent
        checkout = upstream_dir(s.trainer)
        if not (checkout / "train.py").is_file():
            print(f"{s.trainer}: skipped, {checkout.name} not found at {checkout} "
                  "(run: python third_party/install.py)", file=sys.stderr)
            settings_list.remove(s)
    if not settings_list:
        print("coop_protocols: error: nothing can run (see the lines above)", file=sys.stderr)
        return 2
    for s in settings_list:
        method = registry.methods().get(s.trainer)
        if args.protocol in UNSEEN_CLASS_PROTOCOLS and method and not method.scores_unseen_classes:
            print(f"coop_protocols: error: {s.trainer} scores only the classes it was fitted on: "
                  f"no {args.protocol} (its few-shot runs: train_coop.py, docs/coop.md)",
                  file=sys.stderr)
            return 2
    if args.protocol != "base2new":
        wanted = [d for d in wanted if d.key != SOURCE]
    try:
        for s in settings_list:
            check_method_opts(s.trainer, [*s.opts, *args.opts])
    except ValueError as e:
        print(f"coop_protocols: error: {e}", file=sys.stderr)
        return 2
    for s in settings_list:
        for path in {s.config, *s.config_by_dataset.values(), *filter(None, [s.source_config])}:
            if not path.is_file():
                print(f"coop_protocols: error: {s.trainer}: no config file {path}", file=sys.stderr)
                return 2

    infos, present = {}, []
    checked = wanted + ([DATASETS[SOURCE]] if args.protocol != "base2new" else [])
    for dataset in checked:
        problem, info = dataset.check(root)
        if problem:
            print(problem, file=sys.stderr)
        else:
            infos[dataset.key] = info
            present.append(dataset)
    clip_dir = args.openai_clip_dir or os.environ.get(OPENAI_CLIP_DIR_ENV)
    usable = []
    for s in settings_list:
        problem = openai_weights_problem(s, checked, clip_dir, args.opts)
        if problem:
            print(problem, file=sys.stderr)
            continue
        if s.trainer in OPENAI_CLIP_TRAINERS and not clip_dir:
            print(f"{s.trainer}: no --openai-clip-dir: {upstream_dir(s.trainer).name}'s clip "
                  "downloads OpenAI CLIP into ~/.cache/clip")
        usable.append(s)

    runs = plan(args.protocol, usable, [d for d in wanted if d in present], infos,
                args.seeds, args.shots, root, output, args.opts)
    if args.protocol != "base2new" and SOURCE not in infos:
        runs = [r for r in runs if r.stage == "target" and r.source is None]
        trained = [s.trainer for s in usable if s.train]
        if trained:
            print(f"{', '.join(trained)}: skipped, no ImageNet to train on", file=sys.stderr)
    if not runs:
        print("coop_protocols: error: nothing can run (see the lines above)", file=sys.stderr)
        return 2
    print(f"{args.protocol}: trainers {', '.join(s.trainer for s in usable)}; datasets "
          f"{', '.join(d.name for d in wanted if d in present)}; seeds "
          f"{' '.join(map(str, args.seeds))}; {args.shots} shots; output {output}")
    if args.dry_run:
        if slurm_options is not None:
            todo = [c for c in chains(runs) if not all(is_finished(r.out_dir) for r in c)]
            print(f"# --launcher slurm: {len(todo)} array task(s), each a model and what "
                  "evaluates it")
        for run in runs:
            state = "finished" if is_finished(run.out_dir) else "to run"
            print(f"# {run.label()} ({state}){': ' + run.note if run.note else ''}")
            print(shlex.join(command(run)))
        return 0
    overrides = {}
    if args.openai_clip_dir:
        overrides[OPENAI_CLIP_DIR_ENV] = str(Path(args.openai_clip_dir).expanduser().resolve())
    if slurm_options is not None:
        try:
            outcome = execute_slurm(args.protocol, runs, overrides, slurm_options, output)
        except slurm.SlurmError as e:
            print(f"coop_protocols: error: {e}", file=sys.stderr)
            return 2
        if outcome["submitted"] and not slurm_options.wait:
            print("the tables: once the array is over, the same command without --launcher "
                  "slurm skips every finished run and makes them")
            return 0
    else:
        outcome = execute(runs, dict(os.environ, **overrides), verbose=args.verbose)
    print(f"{outcome['finished']} were finished, {outcome['done']} done now, "
          f"{outcome['failed']} failed, {outcome['blocked']} waiting on a failed model")
    tables = make_tables(args.protocol, output, wanted, figures=not args.no_figures)
    return 1 if outcome["failed"] or outcome["blocked"] or tables else 0


if __name__ == "__main__":
    cli.run(main)
