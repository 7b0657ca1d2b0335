"""Time AlignCLIP's training step over CLIPood's (docs: docs/performance.md).

AlignCLIP's training-step time over CLIPood's, same batch and backbone, measured
side by side (interleaved repeats, median). The paper reports 0.21 s vs 0.19 s per
batch of 36 on a V100 (ratio 1.1); the target is a ratio of at most 1.10.
`measure()` is what benchmarks/harness_costs.py calls.

    python benchmarks/step_time.py                       # tiny-vit, CPU
    python benchmarks/step_time.py --model ViT-B-16 --batch 36 --device cuda --precision bf16
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from algorithms import backbone  # noqa: E402
from algorithms.core.registry import get_method  # noqa: E402
from common import cli  # noqa: E402

CLASSES = 10


def build(name, model, weights, device, precision="auto", **overrides):
    method_cls = get_method(name)
    total_steps = overrides.pop("total_steps", None)
    values = dict(clip_model=model, clip_pretrained=weights, precision=precision, **overrides)
    torch.manual_seed(0)
    return method_cls.create(["class %d" % i for i in range(CLASSES)], values, device=device,
                             total_steps=total_steps).train()


def timed_step(method, images, labels, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    method.update(images, labels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def batch(model, size, device):
    """Random images at the model's input size and labels cycling over the classes."""
    pixels = backbone.image_size_of(model)
    return (torch.randn(size, 3, pixels, pixels, device=device),
            torch.arange(size, device=device) % CLASSES)


def measure(model="tiny-vit", pretrained="", batch_size=36, repeats=10, warmup=2,
            device="cpu", precision="auto", names=("CLIPood", "AlignCLIP")) -> dict:
    """Median training-step seconds of each method, steps interleaved on the same batch."""
    images, labels = batch(model, batch_size, device)
    methods = {name: build(name, model, pretrained, device, precision) for name in names}
    times = {name: [] for name in methods}
    for i in range(warmup + repeats):
        for name, method in methods.items():  # interleaved: same conditions for both
            elapsed = timed_step(method, images, labels, device)
            if i >= warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(t) for name, t in times.items()}
    resolved = next(iter(methods.values())).precision
    result = {"model": model, "batch": batch_size, "device": device, "precision": resolved,
              "repeats": repeats, "seconds": median}
    if {"CLIPood", "AlignCLIP"} <= set(median):
        result["ratio"] = median["AlignCLIP"] / median["CLIPood"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--pretrained", default="", help="tag or checkpoint; '' = random init")
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    args = parser.parse_args(argv)
    result = measure(args.model, args.pretrained, args.batch, args.repeats, args.warmup,
                     args.device, args.precision)
    print(f"model {args.model}, batch {args.batch}, device {args.device}, precision "
          f"{result['precision']}, {args.repeats} interleaved steps each (median)")
    for name, seconds in result["seconds"].items():
        print(f"  {name:10s} {seconds:.4f} s/step")
    print(f"  ratio AlignCLIP / CLIPood = {result['ratio']:.3f} "
          f"(target <= 1.10; paper 0.21/0.19 = 1.11 on a V100)")


if __name__ == "__main__":
    cli.run(main)
