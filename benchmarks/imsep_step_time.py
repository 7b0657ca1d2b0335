"""Time AlignCLIP-IMSep's training step against plain CLIP's (docs: docs/pretraining.md).

Cost of AlignCLIP-IMSep against plain CLIP training, printed side by side in one run.

    python benchmarks/imsep_step_time.py [--model tiny-sharedclip] [--batch-size 64]
                                         [--steps 10] [--device cpu] [--sentence-model NAME|DIR]

Training-step time (forward, loss, backward, AdamW step; median over --steps after
--warmup-steps) on the same model and the same batch for:
  - open_clip's ClipLoss (SharedCLIP alone),
  - IMSepLoss with semantic supervision, sentence embeddings precomputed (looked up by
    tokens, pretraining/sentences.py: the default of pretraining.imsep),
  - IMSepLoss with semantic supervision, the sentence encoder run on each batch's captions
    (what the reference does),
each also as a ratio to ClipLoss; and SharedCLIP's parameter count over the plain CLIP of
the same width (the --model pair and the ViT-B-16 pair, built on the meta device).
Captions are generated (distinct per row); images are random. Prints figures only; nothing
here is a test and nothing is written.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import open_clip
import torch

from common import cli
from pretraining import sentences, sharedclip
from pretraining.imsep_loss import IMSepLoss

PAIRS = {"tiny-sharedclip": "tiny-clip-w64", "SharedCLIP-ViT-B-16": "CLIP-ViT-B-16-w768",
         "SharedCLIP-ViT-B-16-512": None}
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "arrow", "heart")


def captions(n: int) -> list[str]:
    return [f"a {COLORS[i % 8]} {SHAPES[(i // 8) % 8]} number {i}" for i in range(n)]


def step_times(model, loss_fn, images, texts, steps, warmup) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(warmup + steps):
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(**model(images, texts))
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def parameter_counts(shared_name: str, plain_name: str | None) -> tuple[int, int]:
    with torch.device("meta"):
        shared = sharedclip.create_model_and_transforms(shared_name, device="meta")[0]
        plain = open_clip.create_model(plain_name or shared_name, device="meta")  # untied
    return sharedclip.num_parameters(shared), sharedclip.num_parameters(plain)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sharedclip", choices=sorted(PAIRS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sentence-model", default=sentences.DEFAULT_SENTENCE_MODEL)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    sharedclip.register_model_configs()

    torch.manual_seed(0)
    model, _, _ = sharedclip.create_model_and_transforms(args.model, device=args.device,
                                                         output_dict=True)
    tokenizer = open_clip.get_tokenizer(args.model)
    size = model.visual.image_size
    images = torch.randn(args.batch_size, 3, *size, device=args.device)
    caps = captions(args.batch_size)
    texts = tokenizer(caps).to(args.device)
    encoder = sentences.load_sentence_model(args.sentence_model, args.device)
    encoder.eval()
    embeddings = encoder.encode(caps, convert_to_numpy=True, normalize_embeddings=True)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    clip_loss = open_clip.ClipLoss()
    imsep = IMSepLoss(semantic=True)
    runs = [("CLIP loss (open_clip ClipLoss)", clip_loss, None),
            ("IMSep, precomputed sentence embeddings", imsep,
             sentences.SentenceFeatures(sentences.CaptionIndex(caps, tokenizer, embeddings))),
            ("IMSep, sentence encoder in the loop", imsep,
             sentences.SentenceFeatures(sentences.CaptionIndex(caps, tokenizer), encoder))]
    results = []
    for name, loss_fn, hook in runs:
        model.load_state_dict(state)
        handle = hook.attach(model) if hook else None
        times = step_times(model, loss_fn, images, texts, args.steps, args.warmup_steps)
        if handle:
            handle.remove()
        results.append((name, statistics.median(times)))

    base = results[0][1]
    print(f"{args.model}, batch {args.batch_size}, {args.device}, "
          f"torch threads {torch.get_num_threads()}, sentence model {args.sentence_model}; "
          f"median of {args.steps} steps after {args.warmup_steps} warm-up")
    print(f"{'training step':<42} {'seconds':>9} {'x CLIP':>7}")
    for name, t in results:
        print(f"{name:<42} {t:>9.4f} {t / base:>7.2f}")
    print(f"\n{'parameters':<42} {'shared':>13} {'plain CLIP':>13} {'ratio':>6}")
    for shared_name in dict.fromkeys([args.model, "SharedCLIP-ViT-B-16"]):
        shared, plain = parameter_counts(shared_name, PAIRS[shared_name])
        print(f"{shared_name:<42} {shared:>13,} {plain:>13,} {shared / plain:>6.3f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
