"""Train ComAlign's head on image-caption pairs (docs: docs/comalign.md).

Trains ComAlign's lightweight head on image-caption pairs (the harness's recipe: the
reference releases no training code, loss or hyper-parameters).

    python -m algorithms.comalign.train --train world:data/world,split=train \
        --clip-model tiny-vit --clip-pretrained data/clip_cache/...pt --out output/comalign/tiny

Data: any pair set of algorithms/comalign/data.py (COCO train captions via `coco:`,
CSV/TSV, webdataset shards, the generated pairs). Components (regions `--regions`,
default `mask+grid`: annotation/mask boxes topped up with grid boxes; views `--mode`,
default `mask`) are encoded once by the frozen CLIP and cached in HDF5; training then
only runs the head. Each epoch visits every image once with one of its captions drawn
at random (no two captions of one image in a batch: they would be false negatives).

Loss (algorithms/comalign/head.py contrastive_loss): w_global CE(C) + w_entity CE(E) +
w_relation CE(R), symmetric InfoNCE at temperature tau; defaults 1, 1, 1, tau 0.07.
Optimiser: AdamW (lr 1e-4, weight decay 0.01), cosine over all steps, batch 128,
10 epochs; all options. Optional text-side head (`--text-head`).

Checkpoint `<out>/checkpoint.pt` (atomic, loads with torch.load(weights_only=True)):
{"format", "head_config", "image_head", "text_head", "optimizer", "scheduler", "epoch",
"history", "meta"}, written after every epoch; `--resume` (default on) continues from
it. The loss on the training pairs (fixed first caption, eval mode) is logged before
training and after every epoch in `history` and `<out>/train_log.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm

from algorithms.comalign.data import Encoder, PairSet, load_pairs
from algorithms.comalign.head import (HEAD_FORMAT, ComAlignHead, HeadConfig, IdentityHead,
                                      LossWeights, Side, contrastive_loss, refine)
from common import cli
from common.files import atomic_path, write_json_atomic


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="pair set SPEC (algorithms/comalign/data.py)")
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--regions", default="mask+grid")
    ap.add_argument("--mode", default="mask", choices=("mask", "crop"))
    ap.add_argument("--parser", default="auto", choices=("auto", "rules", "spacy"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--w-global", type=float, default=1.0)
    ap.add_argument("--w-entity", type=float, default=1.0)
    ap.add_argument("--w-relation", type=float, default=1.0)
    ap.add_argument("--text-head", action="store_true")
    ap.add_argument("--feedforward", type=int, default=512)
    ap.add_argument("--no-padding-mask", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _side(t: Dict[str, torch.Tensor], idx, device) -> Side:
    return Side.from_tensors({k: v[idx] for k, v in t.items()}).to(device)


def batch_loss(image_head, text_head, img, txt, weights: LossWeights):
    images, token = refine(image_head, img)
    texts, _ = refine(text_head, txt)
    texts.global_ = txt.normalised().global_  # C and the CLIP score use CLIP's text embedding
    return contrastive_loss(images, token, texts, weights)


@torch.no_grad()
def dataset_loss(image_head, text_head, img_t, txt_t, pairs: PairSet, weights, device,
                 batch_size) -> float:
    """Mean batch loss over every image with its first caption, eval mode, fixed order."""
    was = image_head.training
    image_head.eval(), text_head.eval()
    first = [caps[0] for caps in pairs.image_captions()]
    total, n = 0.0, 0
    for s in range(0, len(first), batch_size):
        idx = torch.arange(s, min(len(first), s + batch_size))
        if len(idx) < 2:
            continue
        loss, _ = batch_loss(image_head, text_head, _side(img_t, idx, device),
                             _side(txt_t, torch.tensor([first[i] for i in idx]), device), weights)
        total, n = total + float(loss) * len(idx), n + len(idx)
    image_head.train(was), text_head.train(was)
    return total / max(n, 1)


def save_checkpoint(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(args, encoder: Optional[Encoder] = None) -> dict:
    out = Path(args.out)
    torch.manual_seed(args.seed)
    encoder = encoder or Encoder(args.clip_model, args.clip_pretrained, args.regions, args.mode,
                                 args.parser, device=args.device, progress=not args.no_progress)
    pairs = load_pairs(args.train)
    img_t = encoder.images(pairs.name, pairs.images)
    txt_t = encoder.texts(pairs.name, pairs.captions)
    dim = img_t["global"].shape[-1]
    config = HeadConfig(dim=dim, num_entities=encoder.num_entities,
                        num_relations=encoder.num_relations, feedforward=args.feedforward,
                        padding_mask=not args.no_padding_mask)
    image_head = ComAlignHead(config).to(args.device)
    text_head = ComAlignHead(config).to(args.device) if args.text_head else IdentityHead()
    params = list(image_head.parameters()) + list(text_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(pairs.images) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.epochs * steps_per_epoch))
    weights = LossWeights(args.w_global, args.w_entity, args.w_relation, args.temperature)
    ckpt_path = out / "checkpoint.pt"
    history, start = [], 0
    if ckpt_path.is_file() and not args.no_resume:
        state = torch.load(ckpt_path, map_location=args.device, weights_only=True)
        image_head.load_state_dict(state["image_head"])
        if state.get("text_head") is not None:
            text_head.load_state_dict(state["text_head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = list(state["history"]), int(state["epoch"]) + 1
        print(f"ComAlign: resuming {ckpt_path} after epoch {start - 1}")
    if not history:
        history.append({"epoch": -1, "train_loss_eval": dataset_loss(
            image_head, text_head, img_t, txt_t, pairs, weights, args.device, args.batch_size)})
    captions_of = pairs.image_captions()
    meta = {**encoder.meta(), "train": args.train, "loss": weights.__dict__,
            "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
            "recipe": "harness (the reference publishes no training recipe)"}
    for epoch in range(start, args.epochs):
        g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        perm = torch.randperm(len(pairs.images), generator=g)
        pick = [caps[int(torch.randint(len(caps), (1,), generator=g))] for caps in captions_of]
        image_head.train(), text_head.train()
        running, seen = 0.0, 0
        bar = tqdm(range(0, len(perm), args.batch_size), desc=f"ComAlign epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress, file=sys.stdout)
        for s in bar:
            idx = perm[s:s + args.batch_size]
            if len(idx) < 2:
                continue
            cap = torch.tensor([pick[i] for i in idx])
            loss, logs = batch_loss(image_head, text_head, _side(img_t, idx, args.device),
                                    _side(txt_t, cap, args.device), weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"ComAlign: non-finite loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running, seen = running + logs["loss"] * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        history.append({"epoch": epoch, "train_loss": running / max(seen, 1),
                        "train_loss_eval": dataset_loss(image_head, text_head, img_t, txt_t, pairs,
                                                        weights, args.device, args.batch_size)})
        print(f"ComAlign epoch {epoch + 1}: " + json.dumps(history[-1]))
        save_checkpoint(ckpt_path, {
            "format": HEAD_FORMAT, "head_config": config.as_dict(),
            "image_head": image_head.state_dict(),
            "text_head": text_head.state_dict() if args.text_head else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "history": history, "meta": meta})
    log = {"checkpoint": str(ckpt_path), "history": history, "meta": meta}
    write_json_atomic(out / "train_log.json", log)
    return log


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli.run(main)
