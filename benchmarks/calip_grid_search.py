"""Time CALIP's vectorised beta search against the per-pair loop (docs: docs/performance.md).

CALIP's beta grid search: the vectorised search (algorithms.calip.grid_search) against
the straightforward per-pair loop (grid_search_loop, one argmax over [N, C] per pair),
timed side by side on the same score matrices; prints both times and whether they agree.

    python benchmarks/calip_grid_search.py                       # 10,000 x 1,000, 200 x 200
    python benchmarks/calip_grid_search.py --loop-pairs all      # time the whole loop (long)
    python benchmarks/calip_grid_search.py --scores data/feature_cache/calip_scores/.../x.pt

The loop costs the same for every pair, so by default it is timed on --loop-pairs pairs
(the first rows of the grid, in the reference's order) and extrapolated to the grid;
the counts of those pairs are compared with the vectorised search's (which decides in
float64; pairs where the loop's float32 logits round differently are recomputed in
float64 and must then agree, else the exit status is 1). Synthetic scores
imitate CLIP's: cosines around 0.2, the label ahead by a margin, S2 and S3 correlated
with S0; --scores uses a cache file written by CALIP instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from algorithms.calip_search import beta_grid, grid_search, grid_search_loop  # noqa: E402
from common import cli  # noqa: E402


def synthetic_scores(images: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (images,), generator=g)
    s0 = 0.2 + 0.03 * torch.randn(images, classes, generator=g)
    s0[torch.arange(images), labels] += 0.08
    s2 = 0.6 + 0.02 * torch.randn(images, classes, generator=g) + 0.5 * (s0 - 0.2)
    s3 = 1.0 + 0.05 * torch.randn(images, classes, generator=g) + 1.0 * (s0 - 0.2)
    return s0, s2, s3, labels


def measure(images=10000, classes=1000, grid=200, beta2_max=2.0, beta3_max=0.1,
            loop_pairs="400", scores=None, seed=0, log=print) -> dict:
    """Time the vectorised search and the per-pair loop on the same scores; `log` gets
    the lines main() prints. What benchmarks/harness_costs.py calls."""
    if scores:
        from algorithms.backbone import load_checkpoint  # one line naming the file if unusable
        entry = load_checkpoint(scores, "cpu", "CALIP score file")
        s0, s2, s3, labels = (entry[k] for k in ("s0", "s2", "s3", "labels"))
        source = scores
    else:
        s0, s2, s3, labels = synthetic_scores(images, classes, seed)
        source = "synthetic"
    n, c = s0.shape
    beta2s = beta_grid(beta2_max, grid)
    beta3s = beta_grid(beta3_max, grid)
    pairs = len(beta2s) * len(beta3s)
    loop_pairs = pairs if loop_pairs == "all" else min(pairs, int(loop_pairs))
    log(f"scores: {source}, {n} images x {c} classes ({s0.dtype}); grid {len(beta2s)} x "
        f"{len(beta3s)} = {pairs} pairs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")

    start = time.perf_counter()
    fast = grid_search(s0, s2, s3, labels, beta2s, beta3s)
    fast_s = time.perf_counter() - start
    beta2, beta3, accuracy = fast.best()
    log(f"vectorised grid_search: {fast_s:.2f} s for all {pairs} pairs; best beta2={beta2:.4f} "
        f"beta3={beta3:.4f} accuracy {100 * accuracy:.2f}%")

    rows, rest = divmod(loop_pairs, len(beta3s))
    start = time.perf_counter()
    counts = []
    if rows:
        counts.append(grid_search_loop(s0, s2, s3, labels, beta2s[:rows], beta3s).correct.flatten())
    if rest:
        counts.append(grid_search_loop(s0, s2, s3, labels, beta2s[rows:rows + 1],
                                       beta3s[:rest]).correct.flatten())
    loop_s = time.perf_counter() - start
    loop_total = loop_s * pairs / loop_pairs
    measured = ("measured" if loop_pairs == pairs
                else f"extrapolated from {loop_pairs} pairs ({loop_s:.2f} s)")
    log(f"per-pair loop: {loop_total:.1f} s for {pairs} pairs ({measured}), "
        f"{1000 * loop_s / loop_pairs:.2f} ms per pair")
    looped = torch.cat(counts)
    fast_counts = fast.correct.flatten()[:loop_pairs]
    differ = torch.nonzero(looped != fast_counts).flatten().tolist()
    log(f"agreement on the {loop_pairs} looped pairs: {loop_pairs - len(differ)} "
        "identical counts")
    still = 0
    if differ:
        # the loop adds float32 logits: recompute the differing pairs in float64
        s0d, s2d, s3d = s0.double(), s2.double(), s3.double()
        for flat in differ:
            i, j = divmod(flat, len(beta3s))
            logits = s0d + float(beta2s[i]) * s2d + float(beta3s[j]) * s3d
            still += int((logits.argmax(dim=1) == labels).sum()) != int(fast_counts[flat])
        worst = int((looped - fast_counts).abs().max())
        log(f"  {len(differ)} pairs differ by at most {worst} image(s) (float32 rounding of "
            f"the loop's logits); recomputed in float64, {len(differ) - still} of them agree")
    result = {"images": n, "classes": c, "pairs": pairs, "vectorised_s": fast_s,
              "loop_s": loop_total, "loop_pairs_timed": loop_pairs,
              "loop_extrapolated": loop_pairs != pairs, "speedup": loop_total / fast_s,
              "agree": not still, "threads": torch.get_num_threads()}
    if not still:
        log(f"speed-up: {loop_total / fast_s:.0f}x")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=200, help="points per beta")
    parser.add_argument("--beta2-max", type=float, default=2.0)
    parser.add_argument("--beta3-max", type=float, default=0.1)
    parser.add_argument("--loop-pairs", default="400",
                        help="pairs the loop is timed on ('all' for the whole grid)")
    parser.add_argument("--scores", help="a CALIP score cache file instead of synthetic scores")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.images, args.classes, args.grid, args.beta2_max, args.beta3_max,
                     args.loop_pairs, args.scores, args.seed)
    return 0 if result["agree"] else 1

if __name__ == "__main__":
    cli.run(main)
