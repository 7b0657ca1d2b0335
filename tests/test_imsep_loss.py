"""IMSepLoss (pretraining/imsep_loss.py): a 3x3 example against numbers computed here with
plain loops (math.exp/log), every variant; and two gloo processes whose loss and gradients
equal the single-process loss on the same global batch."""
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pretraining.imsep_loss import IMSepLoss

TAU = 2.0
I = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]
T = [[0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]]  # <I_i, T_i>: .8, .48, .8
S = [[3.0, 0.0, 4.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]]  # not normalised: the loss does it


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def ce(logits):
    """Mean over rows of -log softmax(row)[i] with target i."""
    return sum(math.log(sum(math.exp(v) for v in row)) - row[i]
               for i, row in enumerate(logits)) / len(logits)


def logits(a, b):
    return [[TAU * dot(x, y) for y in b] for x in a]


def separation(a, dist):
    """tau [(A A^T) * D + diag(<I_i, T_i>)]"""
    n = len(a)
    return [[TAU * (dot(a[i], a[j]) * dist[i][j] + (dot(I[i], T[i]) if i == j else 0.0))
             for j in range(n)] for i in range(n)]


SU = [unit(s) for s in S]
SEMANTIC_D = [[1 - dot(SU[i], SU[j]) for j in range(3)] for i in range(3)]
HOLLOW_D = [[0.0 if i == j else 1.0 for j in range(3)] for i in range(3)]
CLIP = ce(logits(I, T)) + ce(logits(T, I))
EXPECTED_SEPARATION = {  # (L_I, L_T)
    "plain": (ce(logits(I, I)), ce(logits(T, T))),
    "semantic": (ce(separation(I, SEMANTIC_D)), ce(separation(T, SEMANTIC_D))),
    "rescale": (ce(separation(I, HOLLOW_D)), ce(separation(T, HOLLOW_D))),
}
MODES = {"plain": {}, "semantic": {"semantic": True}, "rescale": {"rescale_ablation": True}}


def _features():
    return (torch.tensor(I, dtype=torch.float64), torch.tensor(T, dtype=torch.float64),
            torch.tensor(S, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image,text", [(True, True), (True, False), (False, True)])
def test_three_by_three_against_explicit_loops(mode, image, text):
    alpha, beta = 0.7, 0.5
    loss = IMSepLoss(alpha=alpha, beta=beta, separate_image=image, separate_text=text,
                     **MODES[mode])
    i_f, t_f, s_f = _features()
    parts = loss(i_f, t_f, torch.tensor(TAU, dtype=torch.float64), sentence_features=s_f,
                 output_dict=True)
    l_i, l_t = EXPECTED_SEPARATION[mode]
    expected_sep = beta * (l_i * image + l_t * text)
    assert set(parts) == {"clip_loss", "imsep_loss"}  # no "total": not summed twice
    assert parts["clip_loss"].item() == pytest.approx(alpha * CLIP, abs=1e-12)
    assert parts["imsep_loss"].item() == pytest.approx(expected_sep, abs=1e-12)
    total = loss(i_f, t_f, torch.tensor(TAU, dtype=torch.float64), sentence_features=s_f)
    assert total.item() == pytest.approx(alpha * CLIP + expected_sep, abs=1e-12)


def test_the_three_variants_differ_and_the_diagonal_is_the_paired_cosine():
    values = {m: EXPECTED_SEPARATION[m] for m in MODES}
    assert len({v for pair in values.values() for v in pair}) == 6
    # semantic D has a zero diagonal; the ablation's positive logit is <I_i, T_i>, not |I_i|^2
    assert all(abs(SEMANTIC_D[i][i]) < 1e-12 for i in range(3))


def test_clip_term_is_the_sum_of_directions_twice_open_clips_average():
    i_f, t_f, _ = _features()
    scale = torch.tensor(TAU, dtype=torch.float64)
    ours = IMSepLoss(alpha=1.0, beta=0.0)(i_f, t_f, scale)
    assert ours.item() == pytest.approx(2 * open_clip.ClipLoss()(i_f, t_f, scale).item())


def test_semantic_mode_needs_sentence_features_and_excludes_the_ablation():
    i_f, t_f, _ = _features()
    with pytest.raises(ValueError, match="sentence_features"):
        IMSepLoss(semantic=True)(i_f, t_f, torch.tensor(TAU))
    with pytest.raises(ValueError, match="exclude"):
        IMSepLoss(semantic=True, rescale_ablation=True)
    assert IMSepLoss(semantic=True).needs_sentence_features
    assert not IMSepLoss(rescale_ablation=True).needs_sentence_features


# ------------------------------------------------------------------- two gloo processes
N, D_IN, D_SENT = 8, 6, 5


def _problem():
    """A global batch and a tiny 'model' (two linear maps and a logit scale), seeded."""
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    sent = torch.randn(N, D_SENT, generator=g)
    params = [torch.randn(D_IN, 4, generator=g), torch.randn(D_IN, 4, generator=g),
              torch.tensor(1.5)]
    return (x_img.double(), x_txt.double(), sent.double(),
            [p.double().requires_grad_() for p in params])


def _loss_and_grads(loss_fn, x_img, x_txt, sent, params):
    w_img, w_txt, log_scale = params
    value = loss_fn(F.normalize(x_img @ w_img, dim=-1), F.normalize(x_txt @ w_txt, dim=-1),
                    log_scale.exp(), sentence_features=sent)
    grads = torch.autograd.grad(value, params)
    return value.detach(), [g.detach() for g in grads]


def _rank(rank, world_size, init_file, out_dir, settings):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    x_img, x_txt, sent, params = _problem()
    part = slice(rank * N // world_size, (rank + 1) * N // world_size)
    results = {}
    for name, kw in settings.items():
        loss_fn = IMSepLoss(rank=rank, world_size=world_size, **kw)
        value, grads = _loss_and_grads(loss_fn, x_img[part], x_txt[part], sent[part], params)
        for t in (value, *grads):  # what DDP does to gradients: the mean over ranks
            dist.all_reduce(t)
            t /= world_size
        results[name] = (value, grads)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp
    exact = {"gather_with_grad": True}
    settings = {f"{mode}/{local}": {**MODES[mode], **exact, "local_loss": local == "local"}
                for mode in MODES for local in ("global", "local")}
    settings["semantic/no-grad-gather"] = {**MODES["semantic"], "gather_with_grad": False}
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path), settings), nprocs=2,
             join=True)
    results = torch.load(tmp_path / "results.pt")
    x_img, x_txt, sent, params = _problem()
    for name, kw in settings.items():
        single = IMSepLoss(**{k: v for k, v in kw.items() if k in ("semantic", "rescale_ablation")})
        value, grads = _loss_and_grads(single, x_img, x_txt, sent, params)
        got_value, got_grads = results[name]
        torch.testing.assert_close(got_value, value, rtol=1e-12, atol=1e-12, msg=name)
        scale = 0.5 if name.endswith("no-grad-gather") else 1.0  # open_clip's default: grad / N
        for got, want in zip(got_grads[:2], grads[:2]):
            torch.testing.assert_close(got, scale * want, rtol=1e-10, atol=1e-12, msg=name)
        # the logit scale enters every rank's loss whole: exact in every setting
        torch.testing.assert_close(got_grads[2], grads[2], rtol=1e-10, atol=1e-12, msg=name)
