"""Evaluate ComAlign beside CLIP: retrieval and compositional benchmarks (docs: docs/comalign.md).

Evaluate ComAlign beside plain CLIP on the same cached embeddings: image-text
retrieval (R@1/5/10 both ways) and compositional benchmarks.

    python -m algorithms.comalign.evaluate --checkpoint output/comalign/tiny/checkpoint.pt \
        --retrieval world:data/world --compositional worldcomp:data/world --out output/comalign/tiny

Sets (algorithms/comalign/data.py): retrieval `coco:` (val2017, 5k x 25k), `karpathy:`
(COCO 5k test, Flickr30k 1k test), `pairs:`, `world:`; compositional `sugarcrepe:` (all
seven subsets found), `aro:` (VG-Relation, VG-Attribution), `worldcomp:` (the generated
set). CLIP model, weights, regions, view mode and parser default to the checkpoint's;
without `--checkpoint` the head is the identity (untrained ComAlign).

Retrieval: text->image counts a caption as found when its image is in the top k;
image->text when any of the image's captions is (the reference's protocol; retrieval
sets keep 5 captions per image); ties count against the query (common/retrieval.py,
one rule with the pretraining evaluation). Scores are computed in chunks, in fp32
(algorithms/comalign/head.py chunked_retrieval); the "released" fusion's normalisers
are the reference's, over the whole set. Compositional: an item is right when the
image-to-text fused score of the true caption beats the negative's (normalisers over
the set's images x all its captions). Rows: "CLIP" (G) and "ComAlign (<fusion>)".

ComAlign's released files (algorithms/comalign/released.py; docs/comalign.md), scored as
their inference.py scores them, R@1/5/10/50 both ways, plus its two printed lines:

    python -m algorithms.comalign.evaluate --checkpoint ComAlign-CLIP-VIT-B32.pt \
        --released-embeddings embeddings --captions annotations/captions_val2017.json \
        --images val2017 --out output/comalign/released

Record `<out>/comalign_eval.json` ({"kind": "comalign_eval", "model", "checkpoint",
"fusions", "retrieval": {set: {row: {image_to_text: {R@k}, text_to_image: {R@k}}}},
"compositional": {set: {row: {subset: accuracy, "average": ...}}}}, in %; "run": the
run facts of common/run_facts.py: protocol comalign, stage eval, backbone = the CLIP
model, weights_digest = the head checkpoint's sha256 (None: identity head), dataset =
the set specs), collected by results/kind_comalign.py.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Dict, List, Optional

import torch

from algorithms.comalign.data import Encoder, load_compositional, load_pairs
from algorithms.comalign.head import (IdentityHead, Side, aligned_scores, chunked_normalisers,
                                      chunked_retrieval, get_fusion, load_head_checkpoint, refine)
from algorithms.comalign.released import RELEASED_FORMAT
from common import cli
from common.files import write_json_atomic
from common.run_facts import file_digest, run_facts

KIND = "comalign_eval"
PRECISION = "fp32"  # embeddings and scores


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--clip-model")
    ap.add_argument("--clip-pretrained")
    ap.add_argument("--regions")
    ap.add_argument("--mode", choices=("mask", "crop"))
    ap.add_argument("--parser", choices=("auto", "rules", "spacy"))
    ap.add_argument("--retrieval", nargs="*", default=[])
    ap.add_argument("--compositional", nargs="*", default=[])
    ap.add_argument("--released-embeddings", default="",
                    help="folder of the released embeddings.zip's four HDF5 files")
    ap.add_argument("--captions", default="",
                    help="captions_val2017.json (with --released-embeddings)")
    ap.add_argument("--images", default="",
                    help="the val2017 image folder (with --released-embeddings)")
    ap.add_argument("--fusion", nargs="*", default=["released", "figure_mean"])
    ap.add_argument("--image-chunk", type=int, default=1000)
    ap.add_argument("--text-chunk", type=int, default=1000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


@torch.no_grad()
def refine_all(head, t: Dict[str, torch.Tensor], device, batch=1024):
    """(refined normalised side with CLIP's own global, refined global token)."""
    side = Side.from_tensors(t)
    parts, tokens = [], []
    for s in range(0, len(side), batch):
        r, tok = refine(head, side.slice(slice(s, s + batch)).to(device))
        parts.append(r), tokens.append(tok)
    out = Side(*(torch.cat([getattr(p, f) for p in parts]) for f in
                 ("global_", "entities", "entity_mask", "relations", "relation_mask")))
    out.global_ = side.to(device).normalised().global_
    return out, torch.cat(tokens)


def rows_of(fusions: List[str]):
    return [("CLIP", "clip")] + [(f"ComAlign ({f})", f) for f in fusions]


def evaluate_retrieval(encoder, image_head, text_head, spec, fusions, args) -> dict:
    pairs = load_pairs(spec)
    images, token = refine_all(image_head, encoder.images(pairs.name, pairs.images), args.device)
    texts, _ = refine_all(text_head, encoder.texts(pairs.name, pairs.captions), args.device)
    t2i = torch.tensor(pairs.caption_image)
    out = {"set": pairs.name, "num_images": len(pairs.images), "num_captions": len(pairs.captions)}
    for label, fusion in rows_of(fusions):
        out[label] = chunked_retrieval(images, token, texts, t2i, fusion,
                                       image_chunk=args.image_chunk, text_chunk=args.text_chunk)
    return out


def evaluate_compositional(encoder, image_head, text_head, spec, fusions, args) -> dict:
    comp = load_compositional(spec)
    images, token = refine_all(image_head, encoder.images(comp.name, comp.images), args.device)
    texts, _ = refine_all(text_head, encoder.texts(comp.name, comp.positives + comp.negatives),
                          args.device)
    n = len(comp.positives)
    idx = torch.tensor(comp.item_image, device=args.device)
    img_sel, tok_sel = images.slice(idx), token[idx]
    pos, neg = texts.slice(slice(0, n)), texts.slice(slice(n, 2 * n))
    out = {"set": comp.name, "num_items": n}
    for label, fusion in rows_of(fusions):
        f = get_fusion(fusion)
        norms = (chunked_normalisers(images, token, texts, f, args.image_chunk, args.text_chunk)
                 if f.normalise else None)
        right = (aligned_scores(img_sel, tok_sel, pos, f, "i2t", norms) >
                 aligned_scores(img_sel, tok_sel, neg, f, "i2t", norms)).cpu()
        by = collections.defaultdict(list)
        for sub, r in zip(comp.subset, right.tolist()):
            by[sub].append(r)
        accs = {sub: 100.0 * sum(v) / len(v) for sub, v in sorted(by.items())}
        accs["average"] = sum(accs.values()) / len(accs)
        out[label] = accs
    return out


def evaluate_released(encoder, image_head, text_head, fusions, args) -> dict:
    """The released embeddings + captions JSON + images, scored as inference.py scores them."""
    from algorithms.comalign import released
    data = released.load_released_set(args.released_embeddings, args.captions, args.images,
                                      encoder)
    images, token = refine_all(image_head, data["images"], args.device)
    texts, _ = refine_all(text_head, data["texts"], args.device)
    out = {"set": released.RELEASED_SET, "num_images": len(images), "num_captions": len(texts),
           "files": data["files"]}
    for label, fusion in rows_of(fusions):
        out[label] = chunked_retrieval(images, token, texts, data["caption_image"], fusion,
                                       ks=released.RECALL_KS, image_chunk=args.image_chunk,
                                       text_chunk=args.text_chunk)
        if fusion == "released":
            print(f"{label}, as inference.py prints it:\n{released.as_released_print(out[label])}")
    return out


def evaluate(args, encoder: Optional[Encoder] = None) -> dict:
    released_paths = (args.released_embeddings, args.captions, args.images)
    if any(released_paths) and not all(released_paths):
        raise cli.InputError("--released-embeddings, --captions and --images go together "
                             "(the released embeddings, captions_val2017.json, val2017/)")
    meta, head = {}, "identity"
    if args.checkpoint:
        image_head, text_head, ckpt = load_head_checkpoint(args.checkpoint, args.device)
        meta = dict(ckpt.get("meta", {}))
        head = "released" if ckpt.get("format") == RELEASED_FORMAT else "trained"
    else:
        image_head, text_head = IdentityHead(), IdentityHead()
    pick = lambda value, key, default: value if value is not None else meta.get(key, default)
    encoder = encoder or Encoder(
        pick(args.clip_model, "clip_model", "ViT-B-32"),
        pick(args.clip_pretrained, "clip_pretrained", "openai"),
        pick(args.regions, "regions", "mask+grid"), pick(args.mode, "component_mode", "mask"),
        pick(args.parser, "parser", "auto"), meta.get("num_entities", 10),
        meta.get("num_relations", 10), device=args.device, progress=not args.no_progress)
    record = {"kind": KIND, "model": encoder.clip_model, "pretrained": encoder.clip_pretrained,
              "checkpoint": args.checkpoint or None, "head": head,
              "fusions": list(args.fusion), "components": encoder.meta(),
              "retrieval": {}, "compositional": {}}
    record["run"] = run_facts(
        protocol="comalign", stage="eval", method="ComAlign",
        config={"head": head, "clip_pretrained": encoder.clip_pretrained,
                "clip_weights": encoder.weights, "fusions": list(args.fusion),
                "components": encoder.meta(), "retrieval": list(args.retrieval),
                "compositional": list(args.compositional),
                "released_embeddings": args.released_embeddings or None,
                "image_chunk": args.image_chunk,
                "text_chunk": args.text_chunk},
        precision=PRECISION, backbone=encoder.clip_model,
        weights_digest=file_digest(args.checkpoint) if args.checkpoint else None,
        dataset=" | ".join([*args.retrieval, *args.compositional, *(
            [f"released:{args.released_embeddings},captions={args.captions}"]
            if args.released_embeddings else [])]) or None, seeds={})
    if args.released_embeddings:
        r = evaluate_released(encoder, image_head, text_head, args.fusion, args)
        record["retrieval"][r.pop("set")] = r
    for spec in args.retrieval:
        r = evaluate_retrieval(encoder, image_head, text_head, spec, args.fusion, args)
        record["retrieval"][r.pop("set")] = r
    for spec in args.compositional:
        c = evaluate_compositional(encoder, image_head, text_head, spec, args.fusion, args)
        record["compositional"][c.pop("set")] = c
    out = Path(args.out) / "comalign_eval.json"
    write_json_atomic(out, record)
    print(f"ComAlign evaluation: {out}")
    return record


def main(argv=None) -> int:
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli.run(main)
