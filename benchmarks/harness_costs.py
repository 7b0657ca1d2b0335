"""Measure the harness's costs: precision, cache, step time, input (docs: docs/performance.md).

The harness's costs, measured: prints figures and writes one JSON (default
output/harness_costs.json). Every line is a ratio of two things timed side by side in
this run (interleaved repeats, median), or an absolute figure with its device named.
A benchmark, never a test: nothing is asserted.

    python benchmarks/harness_costs.py                   # CPU: tiny-vit, then ViT-B-16 (few steps)
    python benchmarks/harness_costs.py --device cuda     # a GPU: both configs, full batches
    python benchmarks/harness_costs.py --configs tiny    # one config

Per config (a model, random weights, on one device):
- step:      AlignCLIP's training step over CLIPood's, same batch (36 images per domain x
             3 domains) and backbone (benchmarks/step_time.py; target <= 1.05, paper
             0.21 / 0.19 s on a V100 = 1.10);
- taps:      the tapped forward (CLS rows + D-V branch, fused attention:
             algorithms/backbone/taps.py) over a forward that materialises every block's
             full attention map as the reference does (need_weights), forward + backward;
- precision: bf16 (fp16 where the GPU has no bf16) over fp32, per method: training-step
             time, evaluation time for the training-free ones, and peak GPU memory of each;
- saved:     bytes of each method's DomainBed `model.pkl` model_dict over a full CLIP
             state dict;
- eval:      evaluation images/s (ZSCLIP), model GFLOPs per image from the open_clip
             config, on a GPU the share of its peak dense bf16 rate; beside it the input
             pipeline's images/s (JPEG decode + CLIP eval transform, DataLoader with 0 and
             common/env.py's workers per environment);
- cache:     a zero-shot job's evaluation with its features read from the feature cache
             over the same job recomputing them (and the first, writing job over it).
Once per run: CALIP's vectorised beta search on cached scores over the per-pair loop
(benchmarks/calip_grid_search.py).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import calip_grid_search  # noqa: E402
import step_time  # noqa: E402
import recipes  # noqa: E402
from algorithms import backbone  # noqa: E402
from algorithms.core.precision import choose_precision  # noqa: E402
from algorithms.core.registry import get_method, methods  # noqa: E402
from common import cli, env, paths  # noqa: E402
from common.files import write_json_atomic  # noqa: E402

DOMAINS = 3  # a DomainBed step: 36 images from each of 3 source domains
# config -> device kind -> sizes. CPU ViT-B-16: a few images and steps (minutes, not hours)
CONFIGS = {
    "tiny": {"model": "tiny-vit",
             "cpu": dict(per_domain=36, repeats=5, warmup=1, eval_batch=64, eval_batches=4),
             "cuda": dict(per_domain=36, repeats=20, warmup=3, eval_batch=256, eval_batches=8)},
    "vit-b16": {"model": "ViT-B-16",
                "cpu": dict(per_domain=2, repeats=3, warmup=1, eval_batch=8, eval_batches=2),
                "cuda": dict(per_domain=36, repeats=10, warmup=3, eval_batch=256,
                             eval_batches=8)},
}
TRAINING_FREE_TIMED = ("ZSCLIP", "CALIP")
# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets); first match of the name wins
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.5), ("H100", 989.4), ("A100", 312.0),
                    ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0))


# --- timing ------------------------------------------------------------------------------

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict, device, repeats: int, warmup: int) -> dict:
    """Median seconds of each callable, run in turn (same conditions for all)."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            elapsed = timed(fn, device)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(fn, device):
    """Peak GPU memory allocated while fn runs (None off CUDA)."""
    if not str(device).startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def low_precision(device) -> str:
    """What "auto" takes on a GPU (bf16, fp16 without native bf16); bf16 on the CPU."""
    chosen = choose_precision("auto", device)
    return "bf16" if chosen == "fp32" else chosen


# --- the sections ------------------------------------------------------------------------

def section_step(model, sizes, device, log):
    result = step_time.measure(model, "", DOMAINS * sizes["per_domain"], sizes["repeats"],
                               sizes["warmup"], device)
    s = result["seconds"]
    log(f"step  AlignCLIP / CLIPood training step = {result['ratio']:.3f} "
        f"({s['AlignCLIP']:.3f} s / {s['CLIPood']:.3f} s, batch {result['batch']}, "
        f"{result['precision']}; target <= 1.05, paper 1.10 on a V100)")
    return result


def _materialised_block(blk, x, dv: bool):
    """One block as the reference computes it: the full softmax(QK^T) map of every head
    (its head average is what nn.MultiheadAttention(need_weights=True) returns)."""
    attn = blk.attn
    B, N, D = x.shape
    H = attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))
    maps = ((q * (D // H) ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1)  # [B, H, N, N]
    out = maps @ v
    x = x + blk.ls_1(attn.out_proj(out.transpose(1, 2).reshape(B, N, D)))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    dv_update = blk.ls_1(attn.out_proj(v.transpose(1, 2).reshape(B, N, D))) if dv else None
    return x, maps.mean(dim=1), dv_update


def materialised_taps(model, images, attn_layers, dv_start):
    """What encode_image_taps returns, through full attention maps of every block."""
    visual = model.visual
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    maps, x_dv = [], None
    for i, blk in enumerate(visual.transformer.resblocks):
        if i == dv_start:
            x_dv = x
        x, full, dv_update = _materialised_block(blk, x, x_dv is not None)
        maps.append(full)
        if dv_update is not None:
            x_dv = x_dv + dv_update
    tokens = visual.ln_post(x) @ visual.proj
    return backbone.ImageTaps(cls=tokens[:, 0], patches=tokens[:, 1:],
                              cls_attn={i: maps[i][:, 0, 1:] for i in attn_layers},
                              dv_patches=visual.ln_post(x_dv[:, 1:]) @ visual.proj)


def _taps_loss(taps):
    return (taps.cls.float().sum() + taps.patches.float().sum() + taps.dv_patches.float().sum()
            + sum(a.float().sum() for a in taps.cls_attn.values()))


def section_taps(model, sizes, device, log):
    from algorithms.core.precision import autocast
    align = get_method("AlignCLIP")
    hp = {**align.default_hparams(),
          **(recipes.values("AlignCLIP", "tiny") if model.startswith("tiny") else {})}
    torch.manual_seed(0)
    clip, _ = backbone.load_clip(model, None, device=device)
    clip.visual.requires_grad_(True)
    depth = len(clip.visual.transformer.resblocks)
    attn_layers = tuple(range(min(int(hp["aligned_layers"]), depth)))
    dv_start = max(0, depth - int(hp["dv_layers"]))
    images, _ = step_time.batch(model, DOMAINS * sizes["per_domain"], device)
    with torch.no_grad():  # the same numbers, in fp32
        a = backbone.encode_image_taps(clip, images, attn_layers, dv_start)
        b = materialised_taps(clip, images, attn_layers, dv_start)
    differ = max(float((x - y).abs().max()) for x, y in (
        (a.cls, b.cls), (a.patches, b.patches), (a.dv_patches, b.dv_patches),
        *((a.cls_attn[i], b.cls_attn[i]) for i in attn_layers)))
    precision = choose_precision("auto", device)

    def step(forward):
        def run():
            with autocast(precision, torch.device(device).type):
                taps = forward(clip, images, attn_layers, dv_start)
            _taps_loss(taps).backward()
            clip.zero_grad(set_to_none=True)
        return run
    fns = {"tapped": step(backbone.encode_image_taps), "materialised": step(materialised_taps)}
    seconds = interleaved(fns, device, sizes["repeats"], sizes["warmup"])
    memory = {name: peak_bytes(fn, device) for name, fn in fns.items()}
    result = {"batch": images.shape[0], "precision": precision, "seconds": seconds,
              "ratio": seconds["tapped"] / seconds["materialised"], "peak_bytes": memory,
              "max_abs_difference_fp32": differ, "attn_layers": list(attn_layers),
              "dv_start": dv_start}
    mem = (f"; peak memory {memory['tapped'] / 2**20:.0f} / {memory['materialised'] / 2**20:.0f}"
           " MiB" if memory["tapped"] else "")
    log(f"taps  tapped / materialised attention, forward+backward = {result['ratio']:.3f} "
        f"({seconds['tapped']:.3f} s / {seconds['materialised']:.3f} s, batch "
        f"{result['batch']}, {precision}{mem}; same outputs to {differ:.1e} in fp32)")
    return result


def _saved_bytes(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def section_methods(model, sizes, device, log):
    """precision (bf16 over fp32 per method) and saved (model.pkl bytes), one build each."""
    low = low_precision(device)
    train_images, train_labels = step_time.batch(model, DOMAINS * sizes["per_domain"], device)
    eval_images, _ = step_time.batch(model, sizes["eval_batch"], device)
    precision, saved, clip_bytes = {}, {}, None
    for name, method_cls in sorted(methods().items()):
        method = step_time.build(name, model, "", device, "fp32", total_steps=10 ** 6)
        if clip_bytes is None:
            clip_bytes = _saved_bytes(method.clip.state_dict())
        # DomainBed's model.pkl holds {"model_dict": algorithm.state_dict(), ...}
        saved[name] = _saved_bytes({"model_dict": {f"method.{k}": v for k, v in
                                                   method.state_dict().items()}})
        if method_cls.trains:
            what, work = "step", (lambda m=method: m.update(train_images, train_labels))
        elif name in TRAINING_FREE_TIMED:
            method.eval()
            what = "eval"

            def work(m=method):
                with torch.no_grad():
                    m.predict(eval_images)
        else:
            del method
            continue

        def at(p, work=work, m=method):
            def run():
                m.precision = p
                work()
            return run
        fns = {"fp32": at("fp32"), low: at(low)}
        seconds = interleaved(fns, device, sizes["repeats"], sizes["warmup"])
        memory = {p: peak_bytes(fn, device) for p, fn in fns.items()}
        precision[name] = {"what": what, "seconds": seconds, "peak_bytes": memory,
                           "ratio": seconds[low] / seconds["fp32"]}
        mem = (f"; peak {memory[low] / 2**20:.0f} / {memory['fp32'] / 2**20:.0f} MiB"
               if memory["fp32"] else "")
        log(f"prec  {name:11s} {what} {low} / fp32 = {precision[name]['ratio']:.3f} "
            f"({seconds[low]:.3f} s / {seconds['fp32']:.3f} s{mem})")
        del method
    for name, size in saved.items():
        log(f"saved {name:11s} model.pkl model_dict / full CLIP state dict = "
            f"{size / clip_bytes:.2e} ({size:,} / {clip_bytes:,} bytes)")
    return ({"low": low, "batch": train_images.shape[0], "eval_batch": eval_images.shape[0],
             "methods": precision},
            {"clip_state_dict_bytes": clip_bytes, "model_dict_bytes": saved,
             "ratio": {n: s / clip_bytes for n, s in saved.items()}})


def vit_flops_per_image(model) -> float | None:
    """Forward FLOPs (2 x multiply-adds) of an open_clip ViT image tower at its input
    size, from its config: patch embedding, per block QKV + output projections, QK^T and
    AV, the MLP; the final projection of the CLS token. None for other towers."""
    import open_clip
    backbone.register_model_configs()
    cfg = open_clip.get_model_config(model)
    vision = cfg["vision_cfg"]
    if not isinstance(vision.get("layers"), int) or "patch_size" not in vision:
        return None
    size = vision["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch, width, layers = vision["patch_size"], vision["width"], vision["layers"]
    mlp = vision.get("mlp_ratio", 4.0) * width
    patches = (size // patch) ** 2
    tokens = patches + 1
    macs = (patches * 3 * patch * patch * width
            + layers * (4 * tokens * width ** 2 + 2 * tokens ** 2 * width
                        + 2 * tokens * width * mlp)
            + width * cfg["embed_dim"])
    return 2.0 * macs


def peak_bf16_flops(device, override_tflops=None):
    if override_tflops:
        return override_tflops * 1e12
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def _jpeg_folder(root: Path, count: int) -> list:
    """`count` JPEGs of 500 x 375 (a typical photo-dataset size), smooth + noise."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    paths_ = []
    for i in range(count):
        base = torch.rand(3, 1, 1, generator=generator) * 255
        ramp = torch.linspace(0, 60, 500)[None, None, :].expand(3, 375, 500)
        noise = torch.randn(3, 375, 500, generator=generator) * 20
        pixels = (base + ramp + noise).clamp(0, 255).byte().permute(1, 2, 0).numpy()
        path = root / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths_.append(path)
    return paths_


class _Images(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def input_pipeline(model, images: int, batch: int) -> dict:
    """Images/s of DomainBed-style loading (decode + CLIP eval transform) at the model's
    input size, with 0 workers and with workers_per_environment(4)."""
    transform = backbone.clip_transform(backbone.image_size_of(model), train=False)
    counts = sorted({0, env.workers_per_environment(4)})
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _Images(_jpeg_folder(Path(tmp), images), transform)
        for workers in counts:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
            start = time.perf_counter()
            seen = sum(x.shape[0] for x in loader)
            result[workers] = seen / (time.perf_counter() - start)
    return result


def section_eval(model, sizes, device, log, peak_tflops=None):
    precision = choose_precision("auto", device)
    method = step_time.build("ZSCLIP", model, "", device, precision).eval()
    images, _ = step_time.batch(model, sizes["eval_batch"], device)
    flops = vit_flops_per_image(model)
    with torch.no_grad():
        seconds = interleaved({"predict": lambda: [method.predict(images) for _ in
                                                    range(sizes["eval_batches"])]},
                              device, sizes["repeats"], sizes["warmup"])["predict"]
    per_s = sizes["eval_batch"] * sizes["eval_batches"] / seconds
    result = {"precision": precision, "images_per_s": per_s, "flops_per_image": flops,
              "achieved_flops": flops * per_s if flops else None}
    peak = peak_bf16_flops(device, peak_tflops)
    line = f"eval  ZSCLIP evaluation: {per_s:.1f} images/s on {device_name(device)}, {precision}"
    if flops:
        line += f"; {flops / 1e9:.2f} GFLOP/image -> {flops * per_s / 1e12:.3f} TFLOP/s"
    if peak and flops:
        result["share_of_peak_bf16"] = flops * per_s / peak
        line += f" = {100 * flops * per_s / peak:.1f}% of the peak dense bf16 {peak / 1e12:.0f}"
    log(line)
    pipeline = input_pipeline(model, 256 if str(device).startswith("cuda") else 96,
                              min(64, sizes["eval_batch"]))
    result["input_pipeline_images_per_s"] = pipeline
    log("eval  input pipeline (JPEG 500x375 -> CLIP eval transform): " + ", ".join(
        f"{rate:.1f} images/s with {w} worker(s)" for w, rate in pipeline.items())
        + f" on {env.usable_cpus()} CPU(s); model {per_s:.1f} images/s")
    return result


def section_cache(model, sizes, device, log):
    """One zero-shot job's evaluation: recomputing every batch (cache off), the first job
    (encodes and writes) and a second job (same weights and data: reads)."""
    from algorithms.core.feature_cache import batch_digest
    precision = choose_precision("auto", device)
    batches = [step_time.batch(model, sizes["eval_batch"], device)[0]
               for _ in range(sizes["eval_batches"])]
    warm = step_time.batch(model, 2, device)[0]
    saved = os.environ.get(env.CACHE)
    result = {"batches": len(batches), "batch": sizes["eval_batch"], "precision": precision}
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            def job(cache):
                os.environ[env.CACHE] = cache
                method = step_time.build("ZSCLIP", model, "", device, precision).eval()
                method.predict(warm)  # one-off costs (first forward, weights digest)
                calls = []
                hook = method.clip.visual.register_forward_hook(lambda *a: calls.append(1))
                seconds = timed(lambda: [method.predict(b) for b in batches], device)
                hook.remove()
                return seconds, len(calls)
            recompute, calls_off = job("off")
            first, calls_first = job(tmp)
            second, calls_second = job(tmp)
            digest = timed(lambda: batch_digest(batches[0]), device)
            method = step_time.build("ZSCLIP", model, "", device, precision)
            weights_digest = timed(method.encoder_fingerprint, device)  # once per job
            del method
    finally:
        if saved is None:
            os.environ.pop(env.CACHE, None)
        else:
            os.environ[env.CACHE] = saved
    result.update(recompute_s=recompute, first_job_s=first, second_job_s=second,
                  encoder_calls={"recompute": calls_off, "first": calls_first,
                                 "second": calls_second},
                  hit_over_recompute=second / recompute, write_over_recompute=first / recompute,
                  batch_digest_s=digest, weights_digest_s=weights_digest)
    log(f"cache ZSCLIP job reading cached features / recomputing = "
        f"{second / recompute:.3f} ({second:.3f} s / {recompute:.3f} s, {len(batches)} batches of "
        f"{sizes['eval_batch']}, encoder calls {calls_second} vs {calls_off}); the first job, "
        f"writing: {first / recompute:.3f}; digest of one batch {1000 * digest:.1f} ms, of "
        f"the image tower's weights (once per job) {weights_digest:.2f} s")
    return result


def section_calip(args, log):
    log(f"calip CALIP beta search on cached scores ({args.calip_images} images x "
        f"{args.calip_classes} classes), vectorised vs per-pair loop "
        "(benchmarks/calip_grid_search.py):")
    result = calip_grid_search.measure(images=args.calip_images, classes=args.calip_classes,
                                       loop_pairs=str(args.calip_loop_pairs),
                                       log=lambda line: log("      " + line))
    log(f"calip per-pair loop / vectorised search = {result['speedup']:.0f} "
        f"({result['loop_s']:.1f} s / {result['vectorised_s']:.2f} s, CPU, "
        f"{result['threads']} threads)")
    return result


# --- the run -----------------------------------------------------------------------------

def device_name(device) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({env.usable_cpus()} cores)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    info = {"device": device_name(device), "cpu": cpu_model(), "cpus": env.usable_cpus(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_average_start": os.getloadavg()}
    if str(device).startswith("cuda"):
        info["cuda"] = torch.version.cuda
        info["capability"] = list(torch.cuda.get_device_capability(device))
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--sections", nargs="+",
                        default=["step", "taps", "methods", "eval", "cache", "calip"],
                        choices=["step", "taps", "methods", "eval", "cache", "calip"])
    parser.add_argument("--repeats", type=int, help="timed repeats (default: per config)")
    parser.add_argument("--per-domain", type=int, help="images per domain (default: per config)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense bf16 TFLOP/s, when not in the table")
    parser.add_argument("--calip-images", type=int, default=5000)
    parser.add_argument("--calip-classes", type=int, default=345)  # DomainNet's classes
    parser.add_argument("--calip-loop-pairs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=paths.OUTPUT / "harness_costs.json")
    args = parser.parse_args(argv)
    device = args.device
    kind = "cuda" if device.startswith("cuda") else "cpu"
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    record = {"command": " ".join(["python", "benchmarks/harness_costs.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(device), "configs": {}}
    log(f"machine: {record['machine']['device']}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average "
        f"{record['machine']['load_average_start']}")
    started = time.perf_counter()
    saved_cache = os.environ.get(env.CACHE)
    os.environ[env.CACHE] = "off"  # timings below encode; the cache section sets its own
    try:
        run_configs(args, device, kind, record, log)
    finally:
        if saved_cache is None:
            os.environ.pop(env.CACHE, None)
        else:
            os.environ[env.CACHE] = saved_cache
    if "calip" in args.sections:
        record["calip"] = section_calip(args, log)
    record["machine"]["load_average_end"] = os.getloadavg()
    record["seconds"] = time.perf_counter() - started
    record["lines"] = lines
    write_json_atomic(args.out, record)
    print(f"wrote {args.out} ({record['seconds']:.0f} s; load average at the end "
          f"{record['machine']['load_average_end']})")


def run_configs(args, device, kind, record, log):
    for config in args.configs:
        model = CONFIGS[config]["model"]
        sizes = dict(CONFIGS[config][kind])
        if args.repeats:
            sizes["repeats"] = args.repeats
        if args.per_domain:
            sizes["per_domain"] = args.per_domain
        log(f"== {model} (random weights) on {device_name(device)}: {sizes}")
        out = record["configs"][config] = {"model": model, "sizes": sizes}
        if "step" in args.sections:
            out["step"] = section_step(model, sizes, device, log)
        if "taps" in args.sections:
            out["taps"] = section_taps(model, sizes, device, log)
        if "methods" in args.sections:
            out["precision"], out["saved"] = section_methods(model, sizes, device, log)
        if "eval" in args.sections:
            out["eval"] = section_eval(model, sizes, device, log, args.peak_tflops)
        if "cache" in args.sections:
            out["cache"] = section_cache(model, sizes, device, log)


if __name__ == "__main__":
    cli.run(main)
