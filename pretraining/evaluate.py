"""Evaluate a pretrained CLIP: zero-shot, retrieval, probe, modality gap (docs: docs/pretraining.md).

Evaluates a pretrained CLIP / SharedCLIP / AlignCLIP-IMSep checkpoint as Eslami & de Melo
("Mitigate the Gap", ICLR 2025; sarahESL/AlignCLIP `main/{zero_shot,retrieval,
linear_probing}.py`) do, plus modality-gap measures. One JSON record per run.

    python -m pretraining.evaluate --model NAME --checkpoint PATH \
        [--zeroshot SPEC ...] [--retrieval SPEC ...] [--linear-probe SPEC ...] [--gap SPEC ...] \
        --out DIR [--method LABEL] [--templates openai_imagenet] [--seed N] [--suite NAME]

SPEC: `TYPE:PATH[,KEY=VALUE...]` (common/readers.py parse_spec), see pretraining/datasets.py
(cifar10, cifar100, folder, world, and Eslami & de Melo's imagenet-val, imagenet-sketch,
imagenet-a/-r/-o/-v2, flowers-102, food-101, stanford-cars / coco, karpathy, pairs,
world, flickr). Examples:
    --zeroshot cifar10:/data/cifar --zeroshot folder:/data/imagenet-r,classnames=classnames.txt
    --zeroshot world:data/world --retrieval coco:captions_val2017.json,images=val2017
    --retrieval karpathy:dataset_flickr30k.json,images=flickr30k-images,split=test
    --linear-probe cifar100:/data/cifar --gap world:data/world

Model: open_clip by name (the harness's configs registered first: tiny-clip-w64,
tiny-sharedclip, SharedCLIP-ViT-B-16, ...) and a checkpoint file (a bare state dict or
open_clip_train's epoch_N.pt, or Eslami & de Melo's released epoch_N.pt in either of
their layouts, pretraining/released.py; `hf-hub:ORG/REPO/FILE` from the Hugging Face cache
only); a SharedCLIP config is loaded tied (pretraining.sharedclip). `--model local-dir:DIR` loads an exported folder
(pretraining/export.py) without --checkpoint. Features are L2-normalised; preprocessing
is open_clip's eval transform of the config.

--suite NAME runs one of Eslami & de Melo's scripts (eslami-zeroshot-cls,
eslami-distribution-shift, eslami-retrieval; metadata/eslami_evaluation.json): only its
datasets, each once (the record lists those left out), with their class names, templates
and retrieval captions ('a photo of {}', each image's first 5).

Metrics (accuracies and recalls in %):
- zero-shot: classifier = open_clip.build_zero_shot_classifier over the templates (the
  reference uses open_clip.OPENAI_IMAGENET_TEMPLATES for every dataset), logits = I W;
  top-1 and top-5 over images (top-5 is null with 5 classes or fewer); as theirs for
  every dataset (Flowers and Cars too: no mean per class; ImageNet-O: top-1 over its 200
  classes, not an OOD score). Sets with the same class names share one classifier.
- retrieval, R@K for K = 1, 5, 10, S = T I^T: text->image: the caption's own image is among
  the K most similar images; image->text: any of the image's captions is among the K most
  similar captions (reference `main/retrieval.py`, CLIP_benchmark); ties count against the
  query (common/retrieval.py, the rule ComAlign's evaluation shares).
- linear probe: one nn.Linear on frozen normalised image features, cross-entropy, AdamW
  (weight decay 0.01, 0 on the bias), lr 0.005 with a cosine schedule over all steps, no
  warmup, 32 epochs (reference `main/linear_probing.py`); batch size 64 and shuffling
  are ours (the reference's are not given); features of the eval transform, computed once.
  On a small train set the recipe takes few steps (420 images: 224), so the probe is
  undertrained there; --probe-batch-size / --probe-epochs change it.
- gap: pretraining/modality_gap.py on each image's first caption (`captions=all`: every
  pair), plus a PCA figure `projection_<set>.png` and the embeddings `gap_<set>.npz`.

Output: DIR/pretraining_eval.json (kind "pretraining_eval", written atomically, last; its
"run" block: common/run_facts.py, protocol pretraining, stage eval, backbone = --model,
weights_digest = the checkpoint's sha256, precision fp32, dataset = the specs) and
figures beside it. Bad input (missing file or folder, wrong JSON layout, unknown model,
unloadable checkpoint) prints one line `error: ...` and exits 2 before anything is written.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pickle
import re
import sys
import time
from pathlib import Path

import numpy as np

from common import cli, env, readers
from pretraining import datasets as ds

RECORD_NAME = "pretraining_eval.json"
KIND = "pretraining_eval"
FORMAT = 1
RECALL_KS = (1, 5, 10)
PROBE_LR, PROBE_WD = 0.005, 0.01  # the reference's linear-probe recipe
PRECISION = "fp32"  # open_clip's default: the model and features in float32


class EvalError(ValueError):
    """Bad model / checkpoint / option: one line."""


# --------------------------------------------------------------------------- model
def infer_method(model_name: str, checkpoint) -> str:
    """AlignCLIP-IMSep when the checkpoint's open_clip_train log shows the IMSep loss,
    else SharedCLIP for a shared config, else CLIP."""
    from pretraining import sharedclip
    if checkpoint:
        log = Path(checkpoint).resolve().parent.parent / "out.log"
        try:
            if "IMSepLoss(" in log.read_text(errors="replace"):
                return "AlignCLIP-IMSep"
        except OSError:
            pass
    return "SharedCLIP" if sharedclip.is_shared(model_name) else "CLIP"


def load_model(model_name: str, checkpoint, device="cpu"):
    """(model, eval preprocess, tokenizer, tied). Raises EvalError on bad input."""
    import open_clip
    from algorithms.backbone import CheckpointError, released
    from pretraining import sharedclip
    sharedclip.register_model_configs()
    try:  # hf-hub: names come from the Hugging Face cache only, never the network
        if model_name.startswith(released.HF_HUB_PREFIX):  # an open_clip model folder there
            model_name = "local-dir:" + str(released.hf_hub_folder(model_name)[0])
        if checkpoint and str(checkpoint).startswith(released.HF_HUB_PREFIX):
            checkpoint = str(released.resolve_hf_hub(str(checkpoint)))
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise EvalError(f"{folder}: no open_clip_config.json (not an exported model folder)")
        if checkpoint:
            raise EvalError("--checkpoint is not used with a local-dir: model (its weights "
                            "are in the folder)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name)
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            raise EvalError(f"{folder}: cannot load ({str(e).splitlines()[0]})") from None
        return model.to(device).eval(), preprocess, open_clip.get_tokenizer(model_name), False
    if model_name not in open_clip.list_models():
        raise EvalError(f"unknown model {model_name!r} (open_clip configs and the harness's: "
                        f"tiny-clip-w64, tiny-sharedclip, SharedCLIP-ViT-B-16, ...)")
    if not checkpoint:
        raise EvalError("--checkpoint PATH is required (a state dict, open_clip_train's or "
                        "sarahESL/AlignCLIP's epoch_N.pt, or hf-hub:ORG/REPO[/FILE])")
    if not Path(checkpoint).is_file():
        raise EvalError(f"{checkpoint}: no such checkpoint file")
    try:  # the harness's checkpoints and Eslami & de Melo's released layouts
        model, _, preprocess = sharedclip.create_model_and_transforms(
            model_name, pretrained=str(checkpoint), device=device)
    except CheckpointError as e:  # already one line naming the file and the key
        raise EvalError(str(e)) from None
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as e:
        from algorithms.backbone import checkpoint_problem
        raise EvalError(f"{checkpoint}: cannot load as {model_name} "
                        f"({checkpoint_problem(e, model_name)[:300]})") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name), sharedclip.is_tied(model)


def resolve_templates(value: str):
    """A template-set name (algorithms.backbone.TEMPLATE_SETS), a file (one template with
    '{}' per line) or one template with '{}'."""
    from algorithms.backbone import text
    if value and os.path.isfile(value):
        lines = [l.strip() for l in Path(value).read_text().splitlines() if l.strip()]
        bad = [l for l in lines if "{}" not in l]
        if not lines or bad:
            raise EvalError(f"{value}: templates need one '{{}}' per line"
                            f"{f' (not in {bad[0]!r})' if bad else ''}")
        return lines
    try:
        return list(text.resolve_templates(value))
    except ValueError as e:
        raise EvalError(f"--templates: {e}") from None


def _workers():
    return env.num_workers() or 0


def image_features(model, dataset, device="cpu", batch_size=256, desc="images",
                   progress=True):
    """[N, D] L2-normalised image features and the labels (if the dataset yields pairs)."""
    import torch
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=_workers())
    feats, labels = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
            feats.append(model.encode_image(x.to(device), normalize=True).float().cpu())
            if y is not None:
                labels.append(torch.as_tensor(y))
    return torch.cat(feats), (torch.cat(labels) if labels else None)


def text_features(model, tokenizer, texts, device="cpu", batch_size=256, desc="texts",
                  progress=True):
    import torch
    from tqdm import tqdm
    feats = []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress,
                          leave=False):
            tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
            feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(feats)


# --------------------------------------------------------------------------- metrics
def topk_accuracy(logits, labels, ks=(1, 5)) -> dict:
    """{'top1': %, 'top5': % or None when there are no more than k classes}."""
    import torch
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    out = {}
    for k in ks:
        if k > 1 and logits.shape[1] <= k:
            out[f"top{k}"] = None
            continue
        hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = round(100.0 * hit.float().mean().item(), 4)
    return out


def retrieval_recalls(similarity, text_to_image, ks=RECALL_KS) -> dict:
    """R@K in both directions from S[t, i] = cos(text t, image i) (n_texts x n_images);
    text_to_image[t] = index of caption t's image; rounded to 4 decimals. An image counts
    as found in image->text when any of its captions is in its top K; ties count against
    the query (common/retrieval.py)."""
    from common import retrieval
    out = retrieval.retrieval_recalls(similarity, text_to_image, ks)
    return {direction: {k: round(v, 4) for k, v in recalls.items()}
            for direction, recalls in out.items()}


def train_linear_probe(train_x, train_y, num_classes, epochs=32, lr=PROBE_LR, wd=PROBE_WD,
                       batch_size=64, seed=0, progress=True):
    """The reference's logistic regression: nn.Linear, CE, AdamW (wd on the weight only),
    cosine lr from `lr` to 0 over all steps, no warmup."""
    import torch
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(train_y).long()
    clf = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW([{"params": [clf.weight], "weight_decay": wd},
                             {"params": [clf.bias], "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss()
    bar = tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False)
    for _ in bar:
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = loss_fn(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return clf.eval()


# --------------------------------------------------------------------------- runs
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


def _unique(name, taken):
    out, k = name, 2
    while out in taken:
        out, k = f"{name}#{k}", k + 1
    return out


def run_zeroshot(model, preprocess, tokenizer, sets, templates, device, progress) -> dict:
    import open_clip
    results, classifiers = {}, {}  # one classifier per list of class names
    for s in sets:
        key = tuple(s.classnames)
        if key not in classifiers:
            classifiers[key] = open_clip.build_zero_shot_classifier(
                model, tokenizer, s.classnames, templates, num_classes_per_batch=10,
                device=device, use_tqdm=progress and len(s.classnames) > 10)
        weights = classifiers[key]
        feats, labels = image_features(model, s.torch_dataset(preprocess), device,
                                       desc=f"zero-shot {s.name}", progress=progress)
        acc = topk_accuracy(feats @ weights.float().cpu(), labels)
        results[_unique(s.name, results)] = {**acc, "n": len(s), "num_classes": len(s.classnames),
                                             "source": s.source, **s.info}
    return results


def encode_retrieval(model, preprocess, tokenizer, rset, device, progress):
    img, _ = image_features(model, ds.ImageFiles(rset.images, preprocess), device,
                            desc=f"{rset.name} images", progress=progress)
    txt = text_features(model, tokenizer, rset.captions, device,
                        desc=f"{rset.name} captions", progress=progress)
    return img, txt


def run_retrieval(model, preprocess, tokenizer, sets, device, progress) -> dict:
    results = {}
    for s in sets:
        img, txt = encode_retrieval(model, preprocess, tokenizer, s, device, progress)
        results[_unique(s.name, results)] = {
            **retrieval_recalls(txt @ img.T, s.text_to_image), "n_images": len(s.images),
            "n_captions": len(s.captions), "source": s.source, **s.info}
    return results


def run_linear_probe(model, preprocess, probes, device, progress, epochs, batch_size, seed):
    import torch
    results = {}
    for train, tests in probes:
        x, y = image_features(model, train.torch_dataset(preprocess), device,
                              desc=f"probe {train.name} train", progress=progress)
        clf = train_linear_probe(x, y, len(train.classnames), epochs=epochs,
                                 batch_size=batch_size, seed=seed, progress=progress)
        for test in tests:
            tx, ty = image_features(model, test.torch_dataset(preprocess), device,
                                    desc=f"probe {test.name} test", progress=progress)
            with torch.no_grad():
                acc = topk_accuracy(clf(tx), ty)
            results[_unique(test.name, results)] = {
                **acc, "train": train.name, "n_train": len(train), "n_test": len(test),
                "epochs": epochs, "lr": PROBE_LR, "weight_decay": PROBE_WD, "batch_size": batch_size,
                "source": test.source, **{k: v for k, v in test.info.items()}}
    return results


def run_gap(model, preprocess, tokenizer, gap_sets, device, progress):
    """{name: measures}, {name: (image, text) arrays}."""
    from pretraining import modality_gap
    results, arrays = {}, {}
    for s, all_captions in gap_sets:
        pairs = list(enumerate(s.text_to_image)) if all_captions else \
            [(t, i) for i, t in s.first_caption_pairs()]
        img, txt = encode_retrieval(model, preprocess, tokenizer, s, device, progress)
        tidx = [t for t, _ in pairs]
        iidx = [i for _, i in pairs]
        image, text = img[iidx].numpy(), txt[tidx].numpy()
        name = _unique(s.name, results)
        results[name] = {**modality_gap.gap_measures(image, text),
                         "captions": "all" if all_captions else "first", "source": s.source}
        arrays[name] = (image, text)
    return results, arrays


# --------------------------------------------------------------------------- CLI
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pretraining.evaluate",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="SPECs: see pretraining/datasets.py")
    p.add_argument("--model", required=True, help="open_clip model name (or local-dir:DIR)")
    p.add_argument("--checkpoint", help="checkpoint file (state dict or epoch_N.pt)")
    p.add_argument("--method", help="label of the method (default: inferred: CLIP, "
                                    "SharedCLIP or AlignCLIP-IMSep)")
    p.add_argument("--zeroshot", action="append", default=[], metavar="SPEC")
    p.add_argument("--retrieval", action="append", default=[], metavar="SPEC")
    p.add_argument("--linear-probe", action="append", default=[], metavar="SPEC")
    p.add_argument("--gap", action="append", default=[], metavar="SPEC",
                   help="retrieval-type SPEC (option captions=all: every pair)")
    p.add_argument("--suite", choices=sorted(ds.eslami_metadata()["suites"]),
                   help="one of Eslami & de Melo's evaluation scripts: their datasets, class "
                        "names, templates and captions (docs/pretraining.md)")
    p.add_argument("--templates", default="openai_imagenet",
                   help="template set (openai_imagenet, simple_imagenet, photo), a file, "
                        "or one template with {} (default %(default)s, as the reference)")
    p.add_argument("--probe-epochs", type=int, default=32)
    p.add_argument("--probe-batch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256, help="feature batch size")
    p.add_argument("--seed", type=int, default=0, help="recorded; seeds the linear probe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="folder of the record and figures")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def prepare(args) -> dict:
    """Every dataset read and checked (before the model is loaded)."""
    if not (args.zeroshot or args.retrieval or args.linear_probe or args.gap):
        raise EvalError("nothing to evaluate: give --zeroshot, --retrieval, --linear-probe "
                        "or --gap")
    zs_specs = [readers.parse_spec(t, ds.ZEROSHOT_TYPES) for t in args.zeroshot]
    rt_specs = [readers.parse_spec(t, ds.RETRIEVAL_TYPES) for t in args.retrieval]
    if args.suite:
        apply_suite(args, zs_specs, rt_specs)
    zs = [s for spec in zs_specs for s in ds.zeroshot_sets(spec)]
    rt = [ds.retrieval_set(spec) for spec in rt_specs]
    lp = [ds.linear_probe_sets(readers.parse_spec(t, ds.LINEAR_PROBE_TYPES))
          for t in args.linear_probe]
    gaps = []
    for t in args.gap:
        spec = readers.parse_spec(t, ds.RETRIEVAL_TYPES)
        mode = spec.options.pop("captions", "first")
        if mode not in ("first", "all"):
            raise EvalError(f"--gap {t!r}: captions= takes first or all")
        gaps.append((ds.retrieval_set(spec), mode == "all"))
    return {"zeroshot": zs, "retrieval": rt, "linear_probe": lp, "gap": gaps}


def _set_option(spec, key, value, why):
    """Put key=value into a spec; another value given for it is refused."""
    given = spec.options.get(key)
    if given is not None and given != str(value):
        raise EvalError(f"{spec.text!r}: {key}={given} differs from {why} ({key}={value})")
    spec.options[key] = str(value)


def apply_suite(args, zs_specs, rt_specs) -> None:
    """Eslami & de Melo's script `args.suite`: only its dataset types, each once; their
    class names (classnames=eslami), templates and retrieval captions (prompt=,
    per_image=); no linear probe or gap (their scripts run neither)."""
    meta = ds.eslami_metadata()
    suite = meta["suites"][args.suite]
    why = f"--suite {args.suite} ({suite['script']})"
    if args.linear_probe or args.gap:
        raise EvalError(f"{why} runs zero-shot and retrieval only: drop --linear-probe/--gap")
    if args.templates != "openai_imagenet":
        raise EvalError(f"{why} uses their templates (openai_imagenet), not {args.templates!r}")
    seen = set()
    for flag, specs in (("zeroshot", zs_specs), ("retrieval", rt_specs)):
        for spec in specs:
            if spec.type not in suite[flag]:
                allowed = ", ".join(suite[flag]) or "none"
                raise EvalError(f"--{flag} {spec.text!r}: not a dataset of {why} "
                                f"(its --{flag} types: {allowed})")
            if spec.type in seen:
                raise EvalError(f"--{flag} {spec.text!r}: {spec.type} given twice for {why}")
            seen.add(spec.type)
            if flag == "zeroshot":
                _set_option(spec, "classnames", "eslami", f"{why}'s class names")
            else:
                captions = meta["retrieval"]
                _set_option(spec, "prompt", captions["caption_prompt"], f"{why}'s captions")
                _set_option(spec, "per_image", captions["captions_per_image"], f"{why}'s captions")


def suite_record(args) -> dict | None:
    """Which of the script's datasets ran, under their result names."""
    if not args.suite:
        return None
    meta = ds.eslami_metadata()
    suite = meta["suites"][args.suite]
    given = {readers.parse_spec(t, ds.ZEROSHOT_TYPES + ds.RETRIEVAL_TYPES).type: flag
             for flag in ("zeroshot", "retrieval") for t in getattr(args, flag)}
    return {"name": args.suite, "script": suite["script"], "source": meta["source"],
            "missing": [t for t in suite["zeroshot"] + suite["retrieval"] if t not in given],
            "their_names": {t: suite["their_names"][t] for t in given},
            "precision": "theirs amp (float16 autocast on GPU), here fp32"}


def evaluate(args) -> Path:
    import torch
    start = time.time()
    out = Path(args.out)
    data = prepare(args)
    templates = resolve_templates(args.templates) if data["zeroshot"] else None
    model, preprocess, tokenizer, tied = load_model(args.model, args.checkpoint, args.device)
    torch.manual_seed(args.seed)
    progress = not args.quiet
    record = {"kind": KIND, "format": FORMAT, "model": args.model,
              "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
              "method": args.method or infer_method(args.model, args.checkpoint),
              "tied": tied, "seed": args.seed, "templates": args.templates,
              "units": "accuracy and recall in %; gap measures as defined in "
                       "pretraining/modality_gap.py",
              "zeroshot": {}, "retrieval": {}, "linear_probe": {}, "gap": {}, "figures": []}
    if data["zeroshot"]:
        record["zeroshot"] = run_zeroshot(model, preprocess, tokenizer, data["zeroshot"],
                                          templates, args.device, progress)
    if data["retrieval"]:
        record["retrieval"] = run_retrieval(model, preprocess, tokenizer, data["retrieval"],
                                            args.device, progress)
    if data["linear_probe"]:
        record["linear_probe"] = run_linear_probe(model, preprocess, data["linear_probe"],
                                                  args.device, progress, args.probe_epochs,
                                                  args.probe_batch_size, args.seed)
    arrays = {}
    if data["gap"]:
        record["gap"], arrays = run_gap(model, preprocess, tokenizer, data["gap"], args.device,
                                        progress)
    # files: embeddings and figures first, the record last
    from common.files import atomic_path, write_json_atomic
    out.mkdir(parents=True, exist_ok=True)
    for name, (image, text) in arrays.items():
        npz = out / f"gap_{_slug(name)}.npz"
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, image=image.astype(np.float32), text=text.astype(np.float32))
        record["gap"][name]["embeddings"] = npz.name
        if not args.no_figures:
            from pretraining import modality_gap
            fig = modality_gap.projection_figure(
                [(f"{record['method']} ({args.model})", image, text)],
                out / f"projection_{_slug(name)}.png", title=f"PCA of {name} pairs")
            record["gap"][name]["figure"] = fig.name
            record["figures"].append(fig.name)
    record["order"] = {k: list(record[k]) for k in ("zeroshot", "retrieval", "linear_probe",
                                                    "gap")}  # the JSON's keys are sorted
    record["suite"] = suite_record(args)
    record["run"] = run_record(args, record["method"])
    record.update(seconds=round(time.time() - start, 1),
                  created=datetime.datetime.now().isoformat(timespec="seconds"),
                  command=["python", "-m", "pretraining.evaluate", *args.argv])
    return write_json_atomic(out / RECORD_NAME, record)


def run_record(args, method: str) -> dict:
    """The record's run facts (common/run_facts.py): the evaluation settings as config."""
    from common.run_facts import file_digest, run_facts
    from algorithms.backbone.released import HF_HUB_PREFIX, WEIGHT_FILES, weights_file
    weights = weights_file(args.checkpoint)
    folder = None
    if args.model.startswith("local-dir:"):  # an exported folder's weights file
        folder = Path(args.model[len("local-dir:"):])
    elif args.model.startswith(HF_HUB_PREFIX):
        folder = Path(weights_file(args.model)).parent
    if folder is not None:
        weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    specs = {"zeroshot": args.zeroshot, "retrieval": args.retrieval,
             "linear_probe": args.linear_probe, "gap": args.gap}
    config = {**{k: list(v) for k, v in specs.items()}, "suite": args.suite,
              "templates": args.templates,
              "probe_epochs": args.probe_epochs, "probe_batch_size": args.probe_batch_size,
              "batch_size": args.batch_size}
    return run_facts(protocol="pretraining", stage="eval", method=method, config=config,
                     precision=PRECISION, backbone=args.model,
                     weights_digest=file_digest(weights) if weights else None,
                     dataset=" | ".join(t for v in specs.values() for t in v) or None,
                     seeds={"seed": args.seed})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        path = evaluate(args)
    except (readers.DataError, EvalError) as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
