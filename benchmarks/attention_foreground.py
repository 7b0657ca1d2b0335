"""Measure CLS attention on the object before/after fine-tuning (docs: docs/performance.md).

Where does CLIP look? Share of the CLS token's attention that falls on the object
(the world's foreground masks), before and after fine-tuning with AlignCLIP and
CLIPood, on held-out images, beside their accuracy on held-out images of the training
domains and of the held-out domain; saves overlay figures and a JSON of the numbers.

    python benchmarks/attention_foreground.py --world data/world [--steps 150]
        [--align-weights 10 1 0.1]   # one AlignCLIP per lambda (default: its own, 10)

Attention = what AlignCLIP aligns: CLS->patch attention of the first aligned blocks,
head-averaged, L1-normalised, averaged over blocks. Foreground share of an image =
sum_k a_k * (foreground fraction of patch k).
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from algorithms import backbone
from algorithms.alignclip import layer_averaged_attention
from algorithms.core.registry import get_method
from clipworld import generate as world
from common import cli
from common.files import write_atomic, write_json_atomic
from common.paths import OUTPUT


TRAIN_DOMAINS = ("photo", "sketch", "cartoon")


def load_split(world_root, size, held_out_every=4):
    """DomainBed-layout images of all domains with their masks; every `held_out_every`-th
    image per class/domain is held out for measuring, the rest is for training."""
    root = Path(world_root) / "domainbed" / world.DOMAINBED_DIRNAME
    transform = backbone.clip_transform(size, train=False)
    train, test = [], []
    for domain in world.DOMAINS:
        for label, name in enumerate(world.CLASSES):
            folder = root / domain / world.class_folder(name)
            for i, path in enumerate(sorted(folder.glob("*.png"))):
                mask = np.load(path.with_name(path.stem + "_mask.npy"))
                item = (transform(Image.open(path)), label, mask, domain, path)
                if i % held_out_every == 0:
                    test.append(item)
                elif domain in TRAIN_DOMAINS:
                    train.append(item)
    return train, test


def patch_foreground(mask: np.ndarray, grid: int) -> torch.Tensor:
    """Foreground fraction per patch, row-major like the ViT's patch tokens: [grid*grid]."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, grid).flatten()


@torch.no_grad()
def attention_maps(method, images, layers, batch=64):
    averaged = getattr(method, "averaged_weights", contextlib.nullcontext)
    maps = []
    with averaged():  # the weights the method predicts with (its average, if any)
        for start in range(0, len(images), batch):
            taps = backbone.encode_image_taps(method.clip, images[start:start + batch],
                                              attn_layers=layers)
            maps.append(layer_averaged_attention([taps.cls_attn[i] for i in layers]))
    return torch.cat(maps)


def foreground_share(maps, foreground):
    return (maps * foreground).sum(dim=1)


@torch.no_grad()
def correct(method, images, labels, batch=64):
    method.eval()
    hits = [method.predict(images[s:s + batch]).argmax(dim=1) == labels[s:s + batch]
            for s in range(0, len(images), batch)]
    return torch.cat(hits).float().numpy()


def train(method, train_items, steps, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.stack([item[0] for item in train_items])
    labels = torch.tensor([item[1] for item in train_items])
    method.train()
    for _ in tqdm(range(steps), desc=f"train {method.name}"):
        idx = torch.randint(len(images), (batch,), generator=generator)
        method.update(images[idx], labels[idx])
    method.eval()


def save_overlays(path, items, maps_by_model, grid, n=6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(maps_by_model)
    fig, axes = plt.subplots(n, 1 + len(names), figsize=(2.2 * (1 + len(names)), 2.2 * n))
    for row in range(n):
        image = np.asarray(Image.open(items[row][4]).convert("RGB"))
        axes[row, 0].imshow(image)
        axes[row, 0].contour(items[row][2], levels=[0.5], colors="lime", linewidths=0.8)
        axes[row, 0].set_title(f"{items[row][3]}", fontsize=8)
        vmax = max(float(maps_by_model[name][row].max()) for name in names)  # one scale per row
        for col, name in enumerate(names, start=1):
            heat = maps_by_model[name][row].reshape(grid, grid).numpy()
            axes[row, col].imshow(image)
            axes[row, col].imshow(heat, cmap="jet", alpha=0.5, interpolation="bilinear",
                                  vmin=0.0, vmax=vmax,
                                  extent=(0, image.shape[1], image.shape[0], 0))
            axes[row, col].contour(items[row][2], levels=[0.5], colors="white", linewidths=0.6)
            if row == 0:
                axes[row, col].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--clip-model", default="tiny-vit")
    parser.add_argument("--clip-pretrained", default=None,
                        help="checkpoint; default: the harness's pretrained tiny CLIP")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align-weights", type=float, nargs="+", default=None,
                        help="AlignCLIP's lambda, one run each (default: its declared 10)")
    parser.add_argument("--out", default=str(OUTPUT / "attention"))
    args = parser.parse_args(argv)
    if args.clip_pretrained is None:
        from pretraining import tiny_clip as pretrain
        args.clip_pretrained = str(pretrain.pretrain(args.world))
    size = backbone.image_size_of(args.clip_model)
    train_items, test_items = load_split(args.world, size)
    images = torch.stack([item[0] for item in test_items])
    labels = torch.tensor([item[1] for item in test_items])
    runs = [("CLIPood", "CLIPood", {})]
    if args.align_weights is None:
        runs.append(("AlignCLIP", "AlignCLIP", {}))
    else:
        runs += [(f"AlignCLIP lambda={w:g}", "AlignCLIP", {"align_weight": w})
                 for w in args.align_weights]
    methods = {}
    for label, name, overrides in runs:
        method_cls = get_method(name)
        values = dict(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                      lr=args.lr, **overrides)
        torch.manual_seed(args.seed)
        methods[label] = method_cls.create(list(world.CLASSES), values, device="cpu",
                                           total_steps=args.steps)
    first = methods[runs[1][0]]
    layers, grid = first.attn_layers, first.visual.grid_size[0]
    foreground = torch.stack([patch_foreground(item[2], grid) for item in test_items])
    maps = {"before": attention_maps(methods["CLIPood"], images, layers)}
    hits = {"before": correct(methods["CLIPood"], images, labels)}
    for name, method in methods.items():
        train(method, train_items, args.steps, args.batch, args.seed)
        maps[f"{name} after"] = attention_maps(method, images, layers)
        hits[f"{name} after"] = correct(method, images, labels)
    domains = np.array([item[3] for item in test_items])
    seen = np.isin(domains, TRAIN_DOMAINS)
    report = {"clip_pretrained": args.clip_pretrained, "steps": args.steps, "lr": args.lr,
              "layers": list(layers), "n_test_images": len(test_items),
              "uniform_attention_share": float(foreground.mean()), "share": {},
              "accuracy": {name: {"in_domain": float(h[seen].mean()),
                                  "out_of_domain": float(h[~seen].mean())}
                           for name, h in hits.items()}}
    for name, m in maps.items():
        share = foreground_share(m, foreground).numpy()
        report["share"][name] = {"all": float(share.mean()),
                                 **{d: float(share[domains == d].mean()) for d in world.DOMAINS}}
    out = Path(args.out)
    write_json_atomic(out / "foreground_share.json", report)
    save_overlays(out / "attention_overlays.png", test_items[::max(1, len(test_items) // 6)],
                  {k: v[::max(1, len(test_items) // 6)] for k, v in maps.items()}, grid)
    print(f"share of CLS attention on the object (uniform attention: "
          f"{report['uniform_attention_share']:.3f}), first {len(layers)} blocks, "
          f"{len(test_items)} held-out images")
    for name, shares in report["share"].items():
        accuracy = report["accuracy"][name]
        print(f"  {name:26s} all {shares['all']:.3f}  " +
              "  ".join(f"{d} {shares[d]:.3f}" for d in world.DOMAINS) +
              f"  | accuracy in-domain {100 * accuracy['in_domain']:.1f}"
              f"  out-of-domain {100 * accuracy['out_of_domain']:.1f}")
    print(f"figures and numbers in {out}/")


if __name__ == "__main__":
    cli.run(main)
