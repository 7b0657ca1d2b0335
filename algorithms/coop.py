"""CoOp (Zhou et al., IJCV 2022; KaiyangZhou/CoOp trainers/coop.py): learned context
vectors in front of (or around) each class name, the rest of CLIP frozen. Registered as
`CoOpHarness`, beside CoOp's own Dassl trainer `CoOp` (see docs/methods/coop.md).

The prompt-learner pieces CoCoOp (algorithms/cocoop.py) and KgCoOp (algorithms/kgcoop.py)
share are here, as small functions:
- `prompt_template`: the token ids of "[SOS] X..X name . [EOS]" per class (or the
  context words of `ctx_init` in the X slots) and each name's token count;
- `class_token_order`: where the class name goes (end, middle, front), as a permutation
  of the template's positions;
- `assemble_prompts`: the template's token embeddings with the context vectors in the
  X slots, permuted into place;
- `encode_prompts`: open_clip CLIP's text tower run on token embeddings instead of token
  ids (the features at the EOT position, projected).

Logits: z_c = tau * <normalize(f(x)), normalize(g(P_c))>, P_c = the prompt of class c.
Documentation: docs/methods/coop.md.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.core.hparams import HParams, dassl_sgd, fixed
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"  # the word that holds a context slot in the template (CoOp's)
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer", "ln_final",
              "text_projection", "attn_mask")


# --- prompts as token ids and embeddings --------------------------------------------

def context_length_of(tokenizer, ctx_init: str, n_ctx: int, where: str) -> int:
    """The number of context vectors: the tokens of `ctx_init`, else `n_ctx`; a
    `ctx_init` whose token count is not `n_ctx` is refused (neither silently wins)."""
    if not ctx_init:
        if n_ctx < 1:
            raise ValueError(f"{where}: n_ctx must be at least 1, got {n_ctx}")
        return n_ctx
    tokens = len(tokenizer.encode(ctx_init))
    if tokens != n_ctx:
        raise ValueError(f"{where}: ctx_init {ctx_init!r} is {tokens} tokens but n_ctx is "
                         f"{n_ctx}; set n_ctx {tokens}, or ctx_init '' for {n_ctx} random vectors")
    return tokens


def prompt_template(tokenizer, classnames: Sequence[str], n_ctx: int, ctx_init: str = "",
                    where: str = "prompt") -> Tuple[torch.Tensor, List[int]]:
    """(token ids [C, L], name token counts): "[SOS] ctx name . [EOS] pad" per class, the
    context slots 1..n_ctx holding `ctx_init`'s tokens or the placeholder X. A prompt longer
    than the text tower's context is refused, naming the class."""
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "eot_token_id")):
        raise ValueError(f"{where}: prompt learning needs open_clip's CLIP tokenizer "
                         f"(SimpleTokenizer), got {type(tokenizer).__name__}")
    prefix = ctx_init or " ".join([PLACEHOLDER] * n_ctx)
    name_lens = [len(tokenizer.encode(name)) for name in classnames]
    length = tokenizer.context_length
    for name, count in zip(classnames, name_lens):
        if 1 + n_ctx + count + 2 > length:  # SOS, context, name, ".", EOT
            raise ValueError(f"{where}: the prompt of class {name!r} ({n_ctx} context + "
                             f"{count} name tokens) does not fit the text tower's "
                             f"{length} tokens")
    return tokenizer([f"{prefix} {name}." for name in classnames]), name_lens


def class_token_order(name_lens: Sequence[int], n_ctx: int, position: str,
                      length: int) -> torch.Tensor:
    """[C, L] permutation of each template's positions (SOS 0, context 1..n, name next)
    that puts the class name at `position`: end "SOS ctx name . EOS", middle "SOS
    ctx[:n//2] name ctx[n//2:] . EOS", front "SOS name ctx . EOS" (CoOp's three)."""
    if position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"class_token_position {position!r} not in {CLASS_TOKEN_POSITIONS}")
    orders = []
    for count in name_lens:
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + count))
        rest = list(range(1 + n_ctx + count, length))
        middle = {"end": ctx + name, "front": name + ctx,
                  "middle": ctx[:n_ctx // 2] + name + ctx[n_ctx // 2:]}[position]
        orders.append([0] + middle + rest)
    return torch.tensor(orders, dtype=torch.long)


def assemble_prompts(ctx: torch.Tensor, template: torch.Tensor,
                     order: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings [..., C, L, D]: the template's token embeddings [C, L, D] with
    the context vectors in slots 1..n, then permuted by `order` [C, L]. `ctx` is one
    context [n, D], one per class [C, n, D] (CSC), or per image [B, 1 or C, n, D] (CoCoOp)."""
    classes, length, dim = template.shape
    n_ctx = ctx.shape[-2]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0)
    lead = ctx.shape[:-3]
    ctx = ctx.expand(*lead, classes, n_ctx, dim)
    template = template.expand(*lead, classes, length, dim)
    filled = torch.cat([template[..., :1, :], ctx, template[..., 1 + n_ctx:, :]], dim=-2)
    index = order.expand(*lead, classes, length).unsqueeze(-1).expand(*lead, classes, length, dim)
    return filled.gather(-2, index)


def check_text_tower(clip: nn.Module, where: str) -> None:
    missing = [name for name in TEXT_TOWER if not hasattr(clip, name)]
    if missing:
        raise ValueError(f"{where}: prompt learning needs open_clip's CLIP with its text tower "
                         f"at the top level (no {', '.join(missing)} on {type(clip).__name__})")


def encode_prompts(clip: nn.Module, prompts: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's text features [..., D] (not normalised) of prompt embeddings [..., L, W],
    as open_clip's CLIP.encode_text after its token embedding: positions added, the
    transformer with the causal mask, ln_final, the features at the pooled (EOT) position
    of `token_ids` [..., L], the projection."""
    lead, (length, width) = prompts.shape[:-2], prompts.shape[-2:]
    x = prompts.reshape(-1, length, width)
    ids = token_ids.expand(*lead, length).reshape(-1, length)
    x = x.to(clip.transformer.get_cast_dtype()) + clip.positional_embedding.to(x.dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    x = open_clip.transformer.text_global_pool(x, ids, clip.text_pool_type,
                                               eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(clip.text_projection, nn.Linear):
        x = clip.text_projection(x)
    elif clip.text_projection is not None:
        x = x @ clip.text_projection
    return x.reshape(*lead, -1)


class PromptLearner(nn.Module):
    """The learned context `ctx` ([n, D], or [C, n, D] class-specific) and what it is
    assembled with: per class, the template's token ids and embeddings and the order of
    the class-token position. Only `ctx` is saved: the rest depends on the class names
    and is rebuilt (a base-class model evaluates new classes)."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: Sequence[str], *, n_ctx: int,
                 ctx_init: str = "", csc: bool = False, position: str = "end",
                 where: str = "prompt learner"):
        super().__init__()
        check_text_tower(clip, where)
        self.n_ctx = context_length_of(tokenizer, ctx_init, n_ctx, where)
        if ctx_init and csc:
            raise ValueError(f"{where}: csc (class-specific context) starts from random "
                             f"vectors; set ctx_init ''")
        device = clip.token_embedding.weight.device
        ids, name_lens = prompt_template(tokenizer, classnames, self.n_ctx, ctx_init, where)
        ids = ids.to(device)
        with torch.no_grad():
            template = clip.token_embedding(ids).float()
        if ctx_init:
            ctx = template[0, 1:1 + self.n_ctx].clone()
        else:
            shape = (len(classnames), self.n_ctx) if csc else (self.n_ctx,)
            ctx = torch.empty(*shape, template.shape[-1], device=device).normal_(std=0.02)
        self.ctx = nn.Parameter(ctx)
        order = class_token_order(name_lens, self.n_ctx, position, ids.shape[1]).to(device)
        self.register_buffer("template", template, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("token_ids", ids.gather(1, order), persistent=False)

    def forward(self, ctx: torch.Tensor = None, classes: int = None) -> torch.Tensor:
        """Prompt embeddings of the first `classes` classes (all by default), with `ctx`
        (default: the learned one; CoCoOp passes its image-conditioned ones)."""
        ctx = self.ctx if ctx is None else ctx
        if ctx.dim() == 3:  # class-specific: one context per class
            ctx = ctx[:classes]
        return assemble_prompts(ctx, self.template[:classes], self.order[:classes])


# --- the method ---------------------------------------------------------------------

def prompt_hparams(n_ctx: int = 4, ctx_init: str = "a photo of a") -> HParams:
    """The prompt learners' hyperparameters: CoOp's base-to-new config (vit_b16_ctxv1:
    4 context vectors from "a photo of a", class name at the end, one shared context) and
    its optimiser (Dassl's SGD: lr 0.002, momentum 0.9, weight decay 5e-4)."""
    hparams = dict(clip_hparams())
    hparams.update({
        "n_ctx": fixed(n_ctx),
        "ctx_init": fixed(ctx_init),
        "csc": fixed(False),
        "class_token_position": fixed("end"),
        **dassl_sgd(),
    })
    return hparams


class PromptMethod(CLIPMethod):
    """CLIP with a prompt learner (`self.prompt`): what trains is the prompt; the image
    and text towers stay frozen. The text tower's forward runs like the image encoder's,
    at the method's precision (`run_encoder`)."""
    trains = True

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.prompt = self.make_prompt_learner()

    def make_prompt_learner(self) -> PromptLearner:
        cfg = self.cfg
        return PromptLearner(self.clip, self.tokenizer, self.classnames, n_ctx=cfg.n_ctx,
                             ctx_init=cfg.ctx_init, csc=cfg.csc,
                             position=cfg.class_token_position, where=self.name)

    def make_optimizer(self, params):
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def trainable_parameters(self):
        return self.prompt.parameters()

    def text_features(self, classes: int = None) -> torch.Tensor:
        """[C, D] normalised text features of the learned prompts (first `classes`)."""
        prompts = self.prompt(classes=classes)
        ids = self.prompt.token_ids[:classes]
        return F.normalize(self.run_encoder(encode_prompts, self.clip, prompts, ids), dim=-1)

    def loss(self, images, labels):
        with torch.no_grad():
            features = self.encode_image(images)
        logits = self.logit_scale * features @ self.text_features(self.train_classes).T
        return F.cross_entropy(logits, labels), {}

    def predict(self, images):
        with torch.no_grad():
            return self.logit_scale * self.encode_image(images) @ self.text_features().T


@register_method
class CoOpHarness(PromptMethod):
    """CoOp: one learned context (or one per class, `csc`) for every class."""
    name = "CoOpHarness"

    @staticmethod
    def hparams() -> HParams:
        return prompt_hparams()
