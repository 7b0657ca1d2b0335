"""Tapped image forwards over open_clip's own weights.

- `encode_image_taps` (ViT): CLS embedding, projected patch tokens, CLS->patch attention
  rows of chosen blocks and a parameter-shared D-V branch, in one pass (AlignCLIP).
- `encode_image_tokens` (ViT and ModifiedResNet): the global embedding and every spatial
  token in the joint space, from one run of open_clip's forward (CALIP).
- `encode_image_layers` (any tower): the outputs of named sub-modules, e.g. the stem and
  stage ends `stage_ends` gives (MIRO).
ResNet backbones have no CLS attention maps or D-V branch: `encode_image_taps` raises.
Under autocast (a method's `precision`) the blocks keep the fused
F.scaled_dot_product_attention on half-precision Q, K, V; the tapped CLS rows are
recomputed from the same Q, K in fp32 (one row per head, cheap).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer


@dataclass
class ImageTaps:
    """What one tapped forward returns. Embeddings are projected but not normalised."""
    cls: torch.Tensor                                   # [B, D]
    patches: torch.Tensor                               # [B, P, D]
    cls_attn: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, P]
    dv_patches: Optional[torch.Tensor] = None           # [B, P, D]


def _check_tappable(visual) -> None:
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"attention taps need a ViT image tower; got {type(visual).__name__} "
            "(ResNet backbones support only the global embedding)")
    blocks = visual.transformer.resblocks
    if (visual.attn_pool is not None or visual.pool_type != "tok"
            or not visual.transformer.batch_first
            or not all(isinstance(b, ResidualAttentionBlock) and not hasattr(b, "ln_1_kv")
                       for b in blocks)):
        raise NotImplementedError("attention taps support open_clip ViTs with standard "
                                  "blocks, CLS pooling and no attentional pooler")


DV_MODES = ("dv", "vvv")


def _block(blk: ResidualAttentionBlock, x: torch.Tensor, want_attn: bool, dv_mode: Optional[str]):
    """One open_clip residual block, computed from its own weights, with optional taps:
    the head-averaged CLS-query attention row and the block's update of the
    parameter-shared branch: 'dv' (softmax(QK^T) replaced by the identity, each token
    keeps its own V) or 'vvv' (CLIP Surgery's softmax(VV^T)V)."""
    attn = blk.attn
    B, N, D = x.shape
    H = attn.num_heads
    h = blk.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))  # [B,H,N,d]
    out = F.scaled_dot_product_attention(q, k, v)
    x = x + blk.ls_1(attn.out_proj(out.transpose(1, 2).reshape(B, N, D)))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    cls_attn = dv_update = None
    if want_attn:  # only the CLS row: [B,H,1,N], never the full N x N map; in fp32
        with torch.autocast(x.device.type, enabled=False):
            row = (q[:, :, :1].float() * (D // H) ** -0.5) @ k.float().transpose(-1, -2)
            cls_attn = row.softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    if dv_mode is not None:
        branch = v if dv_mode == "dv" else F.scaled_dot_product_attention(v, v, v)
        dv_update = blk.ls_1(attn.out_proj(branch.transpose(1, 2).reshape(B, N, D)))
    return x, cls_attn, dv_update


def encode_image_taps(model, images: torch.Tensor, attn_layers: Sequence[int] = (),
                      dv_start: Optional[int] = None, dv_mode: str = "dv",
                      visual=None) -> ImageTaps:
    """Tapped forward of an open_clip ViT image tower, one pass.

    attn_layers: 0-based block indices whose CLS->patch attention (head-averaged, over
    the patch keys of the softmax over all keys) is returned.
    dv_start: block index where the D-V branch forks. From there on the branch
    accumulates each block's V-only attention update computed on the main stream
    (CLIP Surgery's dual path, FFN skipped), so it adds one out-projection per block
    and no second pass. The branch shares all weights with the main stream.
    dv_mode: 'dv' (default, AlignCLIP) or 'vvv' (CLIP Surgery's V-V-V attention).
    visual: an image tower to use instead of model.visual (e.g. a moving average).
    """
    visual = visual if visual is not None else model.visual
    if dv_mode not in DV_MODES:
        raise ValueError(f"dv_mode {dv_mode!r} not in {DV_MODES}")
    _check_tappable(visual)
    blocks = visual.transformer.resblocks
    if dv_start is not None and not 0 <= dv_start < len(blocks):
        raise ValueError(f"dv_start={dv_start} outside 0..{len(blocks) - 1}")
    bad = [i for i in attn_layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"attn_layers {bad} outside 0..{len(blocks) - 1}")
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    cls_attn, x_dv = {}, None
    for i, blk in enumerate(blocks):
        if i == dv_start:
            x_dv = x
        x_in = x
        x, attn_row, dv_update = _block(blk, x_in, i in attn_layers,
                                        dv_mode if x_dv is not None else None)
        if attn_row is not None:
            cls_attn[i] = attn_row
        if dv_update is not None:
            x_dv = x_dv + dv_update
    tokens = visual.ln_post(x) @ visual.proj
    dv_patches = (visual.ln_post(x_dv[:, 1:]) @ visual.proj) if x_dv is not None else None
    return ImageTaps(cls=tokens[:, 0], patches=tokens[:, 1:], cls_attn=cls_attn,
                     dv_patches=dv_patches)


# --- spatial tokens (CALIP): the global embedding and every spatial token -------------

def encode_image_tokens(model, images: torch.Tensor):
    """(global [B, D], spatial [B, P, D]) from one run of open_clip's own image forward,
    projected into the joint space, not normalised; `global` is exactly
    `model.encode_image(images)`.

    ViT: the patch tokens after ln_post and proj, as the CLS token is (captured from
    ln_post's output). ModifiedResNet (attention pool): the attention pool's output at
    every spatial query, i.e. the pool run with all HW+1 tokens as queries; its query 0
    is the global embedding (what CALIP's modified CLIP returns, ZiyuGuo99/CALIP
    clip/model.py AttentionPool2d).
    """
    from open_clip.modified_resnet import ModifiedResNet
    visual = model.visual
    captured = {}
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise NotImplementedError("spatial tokens need a ViT with CLS pooling, ln_post "
                                      "on all tokens and no attentional pooler")

        def keep_tokens(module, args, output):
            captured["tokens"] = output
        handle = visual.ln_post.register_forward_hook(keep_tokens)
    elif isinstance(visual, ModifiedResNet):
        def keep_tokens(module, args, output):
            captured["tokens"] = attention_pool_all_queries(module, args[0])
        handle = visual.attnpool.register_forward_hook(keep_tokens)
    else:
        raise NotImplementedError(f"spatial tokens: unsupported image tower {type(visual).__name__}")
    try:
        pooled = model.encode_image(images)
    finally:
        handle.remove()
    tokens = captured["tokens"]
    if isinstance(visual, VisionTransformer):
        if tokens.dim() != 3 or tokens.shape[0] != images.shape[0]:
            raise NotImplementedError("spatial tokens: ln_post did not see [B, N, width] tokens")
        spatial = tokens[:, 1:]
        if visual.proj is not None:
            spatial = spatial @ visual.proj
    else:
        spatial = tokens[1:].transpose(0, 1)
    return pooled, spatial


def attention_pool_all_queries(pool, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ModifiedResNet AttentionPool2d with every token as a query: x [B, C, H, W]
    -> [HW+1, B, D]; row 0 (the mean token's query) is what the pool itself returns."""
    x = x.flatten(2).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    return out


# --- intermediate outputs (MIRO): what chosen sub-modules of the tower return ----------

def stage_ends(visual, stages: int = 4) -> List[str]:
    """Names of the sub-modules of `visual` that end its stem and each of its `stages`
    stages, as kakaobrain/miro taps them (domainbed/networks/ur_networks.py BLOCKNAMES):
    ViT: `conv1` and the last block of each of `stages` near-equal groups of blocks
    (ViT-B/16: blocks 2, 5, 8, 11; fewer blocks than stages: every block);
    ModifiedResNet: `avgpool` (the stem's end) and `layer1`..`layer4`."""
    from open_clip.modified_resnet import ModifiedResNet
    if isinstance(visual, VisionTransformer):
        blocks = len(visual.transformer.resblocks)
        groups = min(stages, blocks)
        ends = [-(-blocks * (g + 1) // groups) - 1 for g in range(groups)]  # ceil division
        return ["conv1", *(f"transformer.resblocks.{i}" for i in ends)]
    if isinstance(visual, ModifiedResNet):
        return ["avgpool", "layer1", "layer2", "layer3", "layer4"]
    raise NotImplementedError(f"stage ends: unsupported image tower {type(visual).__name__}")


def encode_image_layers(visual, images: torch.Tensor,
                        layers: Sequence[str]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(visual(images), [the output of each named sub-module of `visual`, in `layers`
    order]) from one run of the tower's own forward; the hooks are removed after it."""
    modules = dict(visual.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"{type(visual).__name__} has no sub-module {unknown}")
    captured: Dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(module, args, output):
            captured[name] = output
        return keep
    handles = [modules[name].register_forward_hook(keeper(name)) for name in layers]
    try:
        out = visual(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in captured]
    if missing:
        raise RuntimeError(f"{type(visual).__name__}'s forward did not run {missing}")
    return out, [captured[name] for name in layers]
