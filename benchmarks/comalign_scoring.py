"""Time ComAlign's retrieval scoring beside CLIP's (docs: docs/comalign.md).

Time and peak memory of ComAlign's chunked retrieval scoring beside plain CLIP's, on
random normalised embeddings of the given shapes.

    python -m benchmarks.comalign_scoring [--device cpu|cuda] [--configs tiny vitb32]
        [--captions 500 2000] [--full] [--threads N]

Configs (images x captions, embed dim, 10 entity + 10 relation slots per side, about
60% / 40% of them valid):
- tiny:    500 x 2,500, D 64 (the tiny CLIP), measured as is;
- vitb32:  5,000 x 25,000, D 512 (COCO val2017 with ViT-B/32). Without --full the
  5,000 images are kept and the captions cut to each of `--captions` (default 500 and
  2,000); time is scaled linearly to 25,000 captions (every text chunk costs the same;
  the two cuts show it), memory is not scaled: it does not grow with the captions (at
  most one [I, text_chunk] score matrix per direction, one [image_chunk, text_chunk, 10,
  10] cross tensor and the recall counters of common/retrieval.py, 11 floats per image
  and per caption: 1 MB for 25,000 captions; the two cuts show that too).
Each (config, captions, scorer) runs in a fresh process. Time: wall clock and process
CPU time (user + system, all threads; steadier than wall time on a shared machine),
both scaled as above. Peak memory: the process's
peak resident set during the scoring above its resident set when the scoring started
(embeddings made; Linux: /proc/self/clear_refs resets the peak), or
torch.cuda.max_memory_allocated above what was allocated (CUDA). On CPU each process runs
with MALLOC_MMAP_THRESHOLD_=65536 (glibc): large blocks are mapped and returned to the
system when freed, so the resident peak is the peak of live memory; with glibc's
default (a threshold that rises after the first frees) freed blocks stay in the heap and
the resident peak creeps up with the number of chunks processed, whatever is live
(`--default-malloc`; measured: CLIP 49 -> 85 MB from 500 to 8,000 captions, 38 MB flat
with the fixed threshold). Scorers: "CLIP" (G
only) and "ComAlign" (released fusion: two passes, normalisers then scores, components
included). The embeddings themselves (vitb32: 5,000 x 21 x 512 floats = 215 MB for the
images, 43 kB per caption) are not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from common import cli

CONFIGS = {"tiny": (500, 2500, 64), "vitb32": (5000, 25000, 512)}
SCALED_CAPTIONS = (500, 2000)


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    if reset and _status_mb("VmHWM"):
        return _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _side(n, D, device, valid_e=0.6, valid_r=0.4, seed=0):
    from algorithms.comalign.head import Side
    g = torch.Generator().manual_seed(seed)
    em, rm = torch.rand(n, 10, generator=g) < valid_e, torch.rand(n, 10, generator=g) < valid_r
    em[:, 0] = True
    side = Side(torch.randn(n, D, generator=g), torch.randn(n, 10, D, generator=g), em,
                torch.randn(n, 10, D, generator=g), rm)
    return side.normalised().to(device)


def run_one(config: str, scorer: str, device: str, full: bool, image_chunk: int,
            text_chunk: int, captions: int = SCALED_CAPTIONS[0]) -> dict:
    from algorithms.comalign.head import chunked_retrieval
    I, T, D = CONFIGS[config]
    T_run = T if (full or config == "tiny") else min(captions, T)
    images, texts = _side(I, D, device, seed=0), _side(T_run, D, device, seed=1)
    token = images.global_.clone()
    t2i = torch.arange(T_run, device=device) % I
    base = _rss_mb()
    reset = _reset_peak()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    start, cpu_start = time.perf_counter(), time.process_time()
    chunked_retrieval(images, token, texts, t2i, "clip" if scorer == "CLIP" else "released",
                      image_chunk=image_chunk, text_chunk=text_chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
    else:
        peak = _peak_mb(reset) - base
    return {"config": config, "scorer": scorer, "images": I, "captions": T, "dim": D,
            "captions_run": T_run, "seconds_measured": seconds,
            "seconds": seconds * T / T_run, "cpu_seconds": cpu_seconds * T / T_run, "scaled": T_run != T, "peak_mb": max(peak, 0.0),
            "peak_reset": reset, "device": device, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="no scaling: all 25,000 captions")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--image-chunk", type=int, default=1000)
    ap.add_argument("--text-chunk", type=int, default=250)
    ap.add_argument("--captions", type=int, nargs="+", default=list(SCALED_CAPTIONS),
                    help="vitb32 without --full: caption counts run (time scaled to 25,000)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default mmap threshold (resident peak includes freed heap)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--one", nargs=3, metavar=("CONFIG", "SCORER", "CAPTIONS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if min(a.image_chunk, a.text_chunk, *a.captions) < 1:
        ap.error("--image-chunk, --text-chunk and --captions must be positive")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.device, a.full, a.image_chunk,
                                 a.text_chunk, int(a.one[2]))))
        return 0
    print(f"{'config':8} {'scorer':9} {'images x captions':>18} {'D':>4} {'time s':>9} "
          f"{'CPU s':>9} {'peak MB':>8}  note")
    rows = []
    for config in a.configs:
        cuts = [0] if (a.full or config == "tiny") else a.captions
        for captions in cuts:
            for scorer in ("CLIP", "ComAlign"):
                cmd = [sys.executable, "-m", "benchmarks.comalign_scoring", "--one", config, scorer,
                       str(captions), "--device", a.device, "--image-chunk", str(a.image_chunk),
                       "--text-chunk", str(a.text_chunk), "--threads", str(a.threads)] + \
                    (["--full"] if a.full else [])
                env = dict(os.environ) if a.default_malloc else \
                    dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{config:8} {scorer:9} failed: {last}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                note = (f"time scaled from {r['captions_run']} captions ({r['seconds_measured']:.2f} s)"
                        if r["scaled"] else "")
                print(f"{config:8} {scorer:9} {r['images']:>8} x {r['captions']:<8} {r['dim']:>4} "
                      f"{r['seconds']:>9.2f} {r['cpu_seconds']:>9.2f} {r['peak_mb']:>8.1f}  {note}",
                      flush=True)
    print(f"device {a.device}, {rows[0]['threads'] if rows else '?'} torch threads, image chunk "
          f"{a.image_chunk}, text chunk {a.text_chunk}, {os.cpu_count()} CPUs"
          + ("" if a.default_malloc else ", MALLOC_MMAP_THRESHOLD_=65536"))
    if a.json:
        from common.files import write_json_atomic
        write_json_atomic(a.json, {"rows": rows, "argv": sys.argv[1:]})
    return 0


if __name__ == "__main__":
    cli.run(main)
