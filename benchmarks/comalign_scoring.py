"""Time and peak memory of ComAlign's chunked retrieval scoring beside plain CLIP's, on
random normalised embeddings of the given shapes.

    python -m benchmarks.comalign_scoring [--device cpu|cuda] [--full]

Configs (images x captions, embed dim, 10 entity + 10 relation slots per side, about
60% / 40% of them valid):
- tiny:    500 x 2,500, D 64 (the tiny CLIP), measured as is;
- vitb32:  5,000 x 25,000, D 512 (COCO val2017 with ViT-B/32). Without --full the
  captions are cut to 500 and time is scaled linearly to 25,000 (every text chunk costs
  the same; memory does not grow with the captions: at most one [I, text_chunk] score
  matrix, a running top-10 and one [image_chunk, text_chunk, 10, 10] cross tensor).
Each (config, scorer) runs in a fresh process; peak memory is the process's peak
resident set above its resident set after the embeddings were made (CPU), or
torch.cuda.max_memory_allocated (CUDA). Scorers: "CLIP" (G only) and "ComAlign"
(released fusion: two passes, normalisers then scores, components included).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {"tiny": (500, 2500, 64), "vitb32": (5000, 25000, 512)}
SCALED_CAPTIONS = 500


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _side(n, D, device, valid_e=0.6, valid_r=0.4, seed=0):
    from algorithms.comalign_head import Side
    g = torch.Generator().manual_seed(seed)
    em, rm = torch.rand(n, 10, generator=g) < valid_e, torch.rand(n, 10, generator=g) < valid_r
    em[:, 0] = True
    side = Side(torch.randn(n, D, generator=g), torch.randn(n, 10, D, generator=g), em,
                torch.randn(n, 10, D, generator=g), rm)
    return side.normalised().to(device)


def run_one(config: str, scorer: str, device: str, full: bool, image_chunk: int,
            text_chunk: int, scaled_captions: int = SCALED_CAPTIONS) -> dict:
    from algorithms.comalign_head import chunked_retrieval
    I, T, D = CONFIGS[config]
    T_run = T if (full or config == "tiny") else scaled_captions
    images, texts = _side(I, D, device, seed=0), _side(T_run, D, device, seed=1)
    token = images.global_.clone()
    t2i = torch.arange(T_run, device=device) % I
    base = _rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    start = time.perf_counter()
    chunked_retrieval(images, token, texts, t2i, "clip" if scorer == "CLIP" else "released",
                      image_chunk=image_chunk, text_chunk=text_chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"config": config, "scorer": scorer, "images": I, "captions": T, "dim": D,
            "captions_run": T_run, "seconds_measured": seconds,
            "seconds": seconds * T / T_run, "scaled": T_run != T, "peak_mb": max(peak, 0.0),
            "device": device}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="no scaling: all 25,000 captions")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--image-chunk", type=int, default=1000)
    ap.add_argument("--text-chunk", type=int, default=250)
    ap.add_argument("--scaled-captions", type=int, default=SCALED_CAPTIONS)
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "SCORER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(*a.one, a.device, a.full, a.image_chunk, a.text_chunk,
                                 a.scaled_captions)))
        return 0
    print(f"{'config':8} {'scorer':9} {'images x captions':>18} {'D':>4} {'time s':>9} "
          f"{'peak MB':>8}  note")
    for config in a.configs:
        for scorer in ("CLIP", "ComAlign"):
            cmd = [sys.executable, "-m", "benchmarks.comalign_scoring", "--one", config, scorer,
                   "--device", a.device, "--image-chunk", str(a.image_chunk),
                   "--text-chunk", str(a.text_chunk),
                   "--scaled-captions", str(a.scaled_captions)] + (["--full"] if a.full else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{config:8} {scorer:9} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            note = (f"scaled from {r['captions_run']} captions ({r['seconds_measured']:.2f} s)"
                    if r["scaled"] else "")
            print(f"{config:8} {scorer:9} {r['images']:>8} x {r['captions']:<8} {r['dim']:>4} "
                  f"{r['seconds']:>9.2f} {r['peak_mb']:>8.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
