"""Tests: each equation against a naive loop reference and analytic cases, the queue, the model,
the training script (two processes, resume, CLI) and evaluation. `pytest test_snclr.py`."""
import json
import math
import os
import pathlib
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import distributed
from lars import LARS, param_groups
from loss import info_nce, snclr_loss
from memory_queue import MemoryQueue
from model import SNCLR, build_backbone, momentum_schedule
from positiveness import Positiveness

HERE = pathlib.Path(__file__).resolve().parent
TINY = dict(image_size=16, dim=16, mlp_dim=32)  # small enough for a 2-core CPU


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ------------------------------------------------------------- naive loop references ---
def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def loop_info_nce(z, keys, tau, rank):
    B, total = z.shape[0], 0.0
    for b in range(B):
        expo = [math.exp(cos(z[b], keys[j]) / tau) for j in range(keys.shape[0])]
        total += -math.log(expo[rank * B + b] / sum(expo))
    return total / B


def loop_snclr(z, keys, neighbors, w, tau, rank, form):
    """Eq. 2 written out: candidates c_(j,0) = k_j, c_(j,i) = NN(k_j)_i."""
    B, N, K = z.shape[0], keys.shape[0], neighbors.shape[1]
    total = 0.0
    for b in range(B):
        cands = [[keys[j]] + [neighbors[j, i] for i in range(K)] for j in range(N)]
        expo = [[math.exp(cos(z[b], c) / tau) for c in row] for row in cands]
        denom = sum(sum(row) for row in expo)
        p = [e / denom for e in expo[rank * B + b]]            # own key, then own neighbours
        if form == "paper":
            total += -math.log(p[0] + sum(float(w[b, i]) * p[i + 1] for i in range(K)))
        else:
            total += -(math.log(p[0]) + sum(float(w[b, i]) * math.log(p[i + 1]) for i in range(K)))
    return total / B


# ------------------------------------------------------------------------ Eq. 1, Eq. 2 ---
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_info_nce_matches_loop(rank):
    z, keys = torch.randn(4, 8), torch.randn(12, 8)
    assert info_nce(z, keys, 0.3, rank).item() == pytest.approx(loop_info_nce(z, keys, 0.3, rank), rel=1e-5)


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("rank", [0, 1])
def test_snclr_loss_matches_loop(form, rank):
    g = torch.Generator().manual_seed(1)
    z, keys, nb = torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    w = torch.rand(3, 4, generator=g)
    w[0, 1] = 0.0  # a zero weight must be handled exactly by both forms
    got = snclr_loss(z, keys, nb, w, 0.2, rank, form).item()
    assert got == pytest.approx(loop_snclr(z, keys, nb, w, 0.2, rank, form), rel=1e-5)


def test_zero_weights_make_both_forms_infonce_over_candidates():
    z, keys, nb = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 3, 6)
    w = torch.zeros(4, 3)
    code, paper = snclr_loss(z, keys, nb, w, 0.5, form="code"), snclr_loss(z, keys, nb, w, 0.5, form="paper")
    # InfoNCE over the enlarged set: place all neighbours after the keys; positives stay rows 0..B-1
    enlarged = torch.cat([keys, nb.reshape(-1, 6)])
    assert code.item() == pytest.approx(info_nce(z, enlarged, 0.5).item(), rel=1e-5)
    assert paper.item() == pytest.approx(code.item(), rel=1e-5)


def test_k0_equals_info_nce():
    z, keys = torch.randn(4, 6), torch.randn(8, 6)
    for form in ("code", "paper"):
        got = snclr_loss(z, keys, torch.empty(8, 0, 6), torch.empty(4, 0), 0.2, rank=1, form=form)
        assert got.item() == pytest.approx(info_nce(z, keys, 0.2, rank=1).item(), rel=1e-6)


def test_identical_candidates_give_log_of_candidate_count():
    B, N, K = 3, 6, 4
    v = torch.randn(7)
    keys, nb, z = v.expand(N, 7), v.expand(N, K, 7), torch.randn(B, 7)
    w = torch.rand(B, K)
    M = N * (K + 1)  # every p = 1 / M
    assert info_nce(z, keys, 0.1).item() == pytest.approx(math.log(N), rel=1e-6)
    assert snclr_loss(z, keys, nb, torch.zeros(B, K), 0.1).item() == pytest.approx(math.log(M), rel=1e-6)
    code = (math.log(M) * (1 + w.sum(1))).mean().item()            # -(1 + sum w) log(1/M)
    paper = (math.log(M) - torch.log1p(w.sum(1))).mean().item()    # -log((1 + sum w) / M)
    assert snclr_loss(z, keys, nb, w, 0.1, form="code").item() == pytest.approx(code, rel=1e-6)
    assert snclr_loss(z, keys, nb, w, 0.1, form="paper").item() == pytest.approx(paper, rel=1e-6)


def test_rank_offset_is_the_full_batch_split():
    """Mean over ranks of the per-rank loss == the loss of one process holding the whole batch."""
    R, B, K, D = 3, 2, 2, 5
    z, keys, nb, w = torch.randn(R * B, D), torch.randn(R * B, D), torch.randn(R * B, K, D), torch.rand(R * B, K)
    for form in ("code", "paper"):
        whole = snclr_loss(z, keys, nb, w, 0.3, 0, form)
        split = sum(snclr_loss(z[r * B:(r + 1) * B], keys, nb, w[r * B:(r + 1) * B], 0.3, r, form)
                    for r in range(R)) / R
        assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    # and the positive really moves with the rank
    assert info_nce(z[:B], keys, 0.3, 0).item() != pytest.approx(info_nce(z[:B], keys, 0.3, 1).item())


def test_loss_inputs_are_normalised():
    z, keys, nb, w = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    a = snclr_loss(z, keys, nb, w, 0.2)
    b = snclr_loss(3 * z, 0.5 * keys, 7 * nb, w, 0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_losses_keep_float64_to_1e12(form):
    """Given float64 the equations compute in float64: equal to the loop (Python floats) to 1e-12."""
    g = torch.Generator().manual_seed(2)
    z, keys = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    nb, w = torch.randn(6, 4, 5, generator=g, dtype=torch.float64), torch.rand(3, 4, generator=g, dtype=torch.float64)
    got = snclr_loss(z, keys, nb, w, 0.2, 1, form)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(loop_snclr(z, keys, nb, w, 0.2, 1, form), rel=1e-12)
    assert info_nce(z, keys, 0.3, 1).item() == pytest.approx(loop_info_nce(z, keys, 0.3, 1), rel=1e-12)
    # and never below float32: bf16 inputs are computed in float32
    assert snclr_loss(z.bfloat16(), keys.bfloat16(), nb.bfloat16(), w.bfloat16(), 0.2).dtype == torch.float32


@pytest.mark.parametrize("call, match", [
    (lambda: info_nce(torch.randn(2, 4), torch.randn(2, 4), 0.0), "tau"),
    (lambda: info_nce(torch.randn(2, 4), torch.randn(2, 5), 0.2), "same D"),
    (lambda: info_nce(torch.randn(2, 4), torch.randn(4, 4), 0.2, rank=2), "rank=2"),
    (lambda: snclr_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), torch.rand(2, 3), 0.2,
                        form="log"), "form"),
    (lambda: snclr_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 3, 4), torch.rand(2, 3), 0.2),
     "neighbors"),
    (lambda: snclr_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), torch.rand(2, 2), 0.2),
     "weights"),
])
def test_loss_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- Eq. 4 ---
def test_cosine_positiveness_matches_loop():
    y, nb = torch.randn(3, 6), torch.randn(3, 4, 6)
    w = Positiveness(6, "cosine")(y, nb)
    for b in range(3):
        e = [math.exp(cos(y[b], nb[b, i])) for i in range(4)]
        for i in range(4):
            assert w[b, i].item() == pytest.approx(e[i] / sum(e), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 0.1])
def test_cosine_positiveness_temperature_matches_loop_in_float64(t):
    y, nb = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    w = Positiveness(6, "cosine", temperature=t)(y, nb)
    assert w.dtype == torch.float64
    for b in range(3):
        e = [math.exp(cos(y[b], nb[b, i]) / t) for i in range(4)]
        for i in range(4):
            assert w[b, i].item() == pytest.approx(e[i] / sum(e), rel=1e-12)


def test_smaller_temperature_sharpens_and_t1_is_the_released_rule():
    y, nb = torch.randn(8, 6), torch.randn(8, 5, 6)
    released = Positiveness(6, "cosine")(y, nb)
    assert torch.equal(Positiveness(6, "cosine", temperature=1.0)(y, nb), released)
    sharp = Positiveness(6, "cosine", temperature=0.1)(y, nb)
    assert (sharp.max(dim=1).values > released.max(dim=1).values).all()
    assert torch.equal(sharp.argmax(dim=1), released.argmax(dim=1))   # same order, larger spread


def test_learned_gamma_starts_at_one_scales_the_logits_and_learns():
    y, nb = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    att = Positiveness(6, "attention", learn_gamma=True).double()
    assert att.gamma.item() == 1.0 and torch.allclose(att(y, nb), Positiveness(6, "cosine")(y, nb), atol=1e-12)
    with torch.no_grad():
        att.log_gamma.fill_(math.log(3.0))   # gamma = 3: the loop reference with 3 * cos
    w = att(y, nb)
    e = [math.exp(3 * cos(y[1], nb[1, i])) for i in range(4)]
    assert w[1, 2].item() == pytest.approx(e[2] / sum(e), rel=1e-12)
    z, keys, neighbours = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), nb
    snclr_loss(z, keys, neighbours, att(y, nb), 0.2).backward()
    assert att.log_gamma.grad is not None and att.log_gamma.grad.abs().item() > 0
    assert "log_gamma" not in dict(Positiveness(6, "attention").named_parameters())  # fixed gamma = 1
    with pytest.raises(ValueError, match="temperature applies to mode 'cosine' only"):
        Positiveness(6, "attention", temperature=0.5)
    with pytest.raises(ValueError, match="learn_gamma applies to mode 'attention' only"):
        Positiveness(6, "cosine", learn_gamma=True)


def test_attention_starts_as_cosine_and_is_learnable():
    y, nb = torch.randn(3, 6), torch.randn(3, 4, 6)
    att = Positiveness(6, "attention")
    assert torch.allclose(att(y, nb), Positiveness(6, "cosine")(y, nb), atol=1e-6)
    with torch.no_grad():
        att.f1.weight.mul_(5.0)  # a larger scale must sharpen w: loop reference with gamma * 5
    w = att(y, nb)
    e = [math.exp(5 * cos(y[0], nb[0, i])) for i in range(4)]
    assert w[0, 0].item() == pytest.approx(e[0] / sum(e), rel=1e-5)
    assert len(list(att.parameters())) == 2 and not list(Positiveness(6, "cosine").parameters())


@pytest.mark.parametrize("mode, flows", [("cosine", True), ("attention", True), ("hard", False), ("none", False)])
def test_gradient_reaches_y_only_through_learned_weights(mode, flows):
    y = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    keys, nb = torch.randn(4, 8), torch.randn(4, 3, 8)
    w = Positiveness(8, mode)(y, nb)
    snclr_loss(z, keys, nb, w, 0.2).backward()
    got = y.grad is not None and y.grad.abs().sum().item() > 0
    assert got == flows
    assert z.grad.abs().sum() > 0


def test_hard_none_and_threshold():
    y, nb = torch.randn(2, 4), torch.randn(2, 5, 4)
    assert torch.equal(Positiveness(4, "hard")(y, nb), torch.ones(2, 5))
    assert torch.equal(Positiveness(4, "none")(y, nb), torch.zeros(2, 5))
    w = Positiveness(4, "cosine")(y, nb)
    wt = Positiveness(4, "cosine", threshold=True)(y, nb)
    assert torch.equal(wt, torch.where(w >= 0.2, w, 0.0)) and (wt == 0).any() and (wt > 0).any()
    with pytest.raises(ValueError, match="mode 'soft'"):
        Positiveness(4, "soft")
    with pytest.raises(ValueError, match="neighbors"):
        Positiveness(4)(y, torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="dim = 6"):
        Positiveness(6)(y, nb)  # D = 4 features into a module built for 6


# --------------------------------------------------------------- memory queue, Eq. 3 ---
def test_queue_fifo_wraps_around():
    q = MemoryQueue(5, 3)
    batches = [unit(3, 3, seed=s) for s in range(4)]  # 3 does not divide 5
    for keys in batches:
        q.enqueue(keys)
    assert len(q) == 5 and int(q.ptr) == 12 % 5
    # FIFO ring: row r holds the newest key written to position r
    written = [k for keys in batches for k in keys]
    for r in range(5):
        newest = max(i for i in range(len(written)) if i % 5 == r)
        assert torch.allclose(q.features[r], written[newest])
    # so the queue holds exactly the 5 newest keys: written[7..11]
    assert all(any(torch.allclose(row, k) for row in q.features) for k in written[-5:])


def test_queue_partial_fill_and_normalisation():
    q = MemoryQueue(8, 4)
    q.enqueue(3 * torch.randn(3, 4))
    assert len(q) == 3 and int(q.ptr) == 3
    assert torch.allclose(q.features[:3].norm(dim=1), torch.ones(3))
    assert torch.equal(q.features[3:], torch.zeros(5, 4))


def test_queue_searches_filled_slots_only():
    q = MemoryQueue(10, 4)
    entries = unit(4, 4, seed=3)
    q.enqueue(entries)
    query = -entries.sum(0, keepdim=True)  # negative cosine with every filled entry: an empty
    idx = q.nearest_indices(query, 4)      # (zero) slot would score 0 and win if searched
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k=5 neighbours but the queue holds 4"):
        q.nearest_neighbors(query, 5)


def test_queue_topk_matches_brute_force():
    q = MemoryQueue(50, 6)
    q.enqueue(unit(37, 6, seed=4))
    query = torch.randn(5, 6)
    got = q.nearest_neighbors(query, 7)
    assert got.shape == (5, 7, 6)
    for b in range(5):
        sims = sorted(((cos(query[b], q.features[r]), r) for r in range(37)), reverse=True)[:7]
        assert torch.allclose(got[b], q.features[[r for _, r in sims]])


def test_queue_state_survives_state_dict_round_trip():
    q = MemoryQueue(6, 3)
    q.enqueue(unit(4, 3, seed=5))
    q.enqueue(unit(4, 3, seed=6))
    q2 = MemoryQueue(6, 3)
    q2.load_state_dict(q.state_dict())
    assert len(q2) == len(q) and int(q2.ptr) == int(q.ptr) and torch.equal(q2.features, q.features)
    more = unit(2, 3, seed=7)
    q.enqueue(more), q2.enqueue(more)
    assert torch.equal(q2.features, q.features) and int(q2.ptr) == int(q.ptr)


def test_queue_keeps_labels_beside_keys_and_its_fill_level_on_the_host():
    q = MemoryQueue(5, 3)
    q.enqueue(unit(3, 3, seed=1), torch.tensor([7, 8, 9]))
    q.enqueue(unit(3, 3, seed=2))                          # no labels: -1, the wrap overwrites row 0
    assert q.labels.tolist() == [-1, 8, 9, -1, -1] and len(q) == 5
    q.enqueue(unit(2, 3, seed=3), torch.tensor([4, 5]))
    assert q.labels.tolist() == [-1, 4, 5, -1, -1] and int(q.ptr) == 3
    q2 = MemoryQueue(5, 3)
    assert len(q2) == 0
    q2.load_state_dict(q.state_dict())                     # the host copy follows the loaded buffer
    assert len(q2) == 5 and torch.equal(q2.labels, q.labels)
    with pytest.raises(ValueError, match=r"labels of shape \(2,\)"):
        q.enqueue(unit(2, 3, seed=4), torch.tensor([1, 2, 3]))


def test_queue_bad_input():
    q = MemoryQueue(4, 3)
    with pytest.raises(ValueError, match="cannot enqueue 5 keys into a queue of size 4"):
        q.enqueue(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        q.enqueue(torch.randn(2, 4))


# --------------------------------------------------------------------------- model ---
def test_momentum_update_is_ema():
    m = SNCLR("resnet18", **TINY, num_neighbors=0, queue_size=8)
    with torch.no_grad():
        for p in m.online_parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in m.momentum_parameters()]
    online = [p.clone() for p in m.online_parameters()]
    m.momentum_update(0.9)
    for old, new, o in zip(before, m.momentum_parameters(), online):
        assert torch.allclose(new, 0.9 * old + 0.1 * o, atol=1e-6)
    assert not any(p.requires_grad for p in m.momentum_parameters())


def test_momentum_schedule_endpoints():
    assert momentum_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_schedule(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_schedule(100, 100, 0.99) == pytest.approx(1.0)


def test_model_with_k0_is_symmetric_infonce():
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, tau=0.2, num_neighbors=0, queue_size=8)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    k1, k2 = m.momentum_keys(x1), m.momentum_keys(x2)
    empty = torch.empty(4, 0, 16)
    loss, w = m(x1, x2, k1, k2, empty, empty)
    z1, z2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    expected = 2 * 0.2 * (info_nce(z1, k2, 0.2) + info_nce(z2, k1, 0.2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_model_pairs_each_view_with_the_other_views_neighbours():
    """L(z1; k2, NN(k2), w(y1, NN(k2))) + L(z2; k1, NN(k1), w(y2, NN(k1))), rank rows of the gathers."""
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, tau=0.3, num_neighbors=3, queue_size=8)
    B, rank = 4, 1
    x1, x2 = torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16)
    k1, k2 = torch.randn(2 * B, 16), torch.randn(2 * B, 16)              # gathered over 2 ranks
    n1, n2 = unit(2 * B, 3, 16, seed=1), unit(2 * B, 3, 16, seed=2)
    loss, w = m(x1, x2, k1, k2, n1, n2, rank)
    y1, y2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
    z1, z2 = m.predictor(y1), m.predictor(y2)
    own = slice(rank * B, (rank + 1) * B)
    w1, w2 = m.positiveness(y1, n2[own]), m.positiveness(y2, n1[own])
    expected = 0.6 * (snclr_loss(z1, k2, n2, w1, 0.3, rank) + snclr_loss(z2, k1, n1, w2, 0.3, rank))
    swapped = 0.6 * (snclr_loss(z1, k2, n2, m.positiveness(y1, n1[own]), 0.3, rank)
                     + snclr_loss(z2, k1, n1, m.positiveness(y2, n2[own]), 0.3, rank))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(swapped.item(), rel=1e-5)
    assert w.shape == (2 * B, 3) and torch.allclose(w, torch.cat([w1, w2]))   # view 1 rows, then view 2
    assert w.mean().item() == pytest.approx(1 / 3, rel=1e-5)  # cosine w: rows sum to 1


def test_train_step_searches_before_it_enqueues_view2_keys():
    from train import train_step
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=64)
    m.queue.enqueue(unit(5, 16, seed=3))
    found = []
    search = m.queue.nearest_indices
    m.queue.nearest_indices = lambda q, k: found.append(search(q, k)) or found[-1]
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    k2 = m.momentum_keys(x2)  # train-mode BN: the same keys the step computes
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    train_step(m, m, x1, x2, opt, torch.amp.GradScaler("cpu", enabled=False), 0.99)
    assert len(found) == 2 and all(int(i.max()) < 5 for i in found)      # only the 5 older keys
    assert len(m.queue) == 13 and torch.allclose(m.queue.features[5:13], F.normalize(k2, dim=1), atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_backbones_build_and_small_stems(arch):
    net, dim = build_backbone(arch, 16)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, dim)


def test_model_bad_input():
    with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
        SNCLR("resnet7")
    with pytest.raises(ValueError, match="K=9"):
        SNCLR("resnet18", **TINY, num_neighbors=9, queue_size=8)
    with pytest.raises(ValueError, match="tau"):
        SNCLR("resnet18", **TINY, tau=-1.0)
    with pytest.raises(ValueError, match="loss form"):
        SNCLR("resnet18", **TINY, loss_form="mean")
    with pytest.raises(ValueError, match="patch size 4"):
        build_backbone("vit_tiny", 30)


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(arch):
    from train import train_step
    torch.manual_seed(0)
    m = SNCLR(arch, **TINY, tau=0.2, num_neighbors=2, queue_size=256, positiveness="attention")
    m.queue.enqueue(torch.randn(16, 16))  # unrelated keys, so neighbours exist from step 1
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x1, x2 = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    losses = [train_step(m, m, x1, x2, opt, scaler, 0.99)[0].item() for _ in range(12)]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert len(m.queue) == 16 + 12 * 16


# ------------------------------------------------------------------------- optimiser ---
def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    model = torch.nn.Module()
    model.w, model.b = w, b
    LARS(param_groups(model, 0.1), lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01).step()
    u = gw + 0.1 * w0
    u = u * 0.01 * w0.norm() / u.norm()
    assert torch.allclose(w.detach(), w0 - 0.5 * u, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb, atol=1e-6)  # bias: no decay, no adaptation


def test_lars_momentum_accumulates():
    p = torch.nn.Parameter(torch.ones(2, 2))
    model = torch.nn.Module()
    model.p = p
    opt = LARS(param_groups(model, 0.0), lr=1.0, momentum=0.5, trust_coefficient=0.1)
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    velocity, expected = torch.zeros(2, 2), p.detach().clone()
    for _ in range(3):  # loop reference: u = eta ||p|| / ||g|| g, v = mu v + u, p -= lr v
        p.grad = g.clone()
        u = 0.1 * expected.norm() / g.norm() * g
        velocity = 0.5 * velocity + u
        expected = expected - velocity
        opt.step()
        assert torch.allclose(p.detach(), expected, atol=1e-6)


# --------------------------------------------------------------------- 2 processes ---
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frozen_model_and_batch():
    """A tiny SNCLR with a full queue (so the first step uses K = 2 neighbours), in eval mode:
    BatchNorm then uses running statistics, so each image's loss term does not depend on how
    the global batch is split over ranks. Returns the model and a global batch of 8 image pairs."""
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=32).eval()
    m.queue.enqueue(torch.randn(32, TINY["dim"]))
    return m, torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)


def _two_rank_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    from distributed import wrap_ddp
    from train import train_step
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # (1) train_step's loss, averaged over ranks = its loss on the concatenated batch in one process
    m, x1, x2 = _frozen_model_and_batch()
    mine = slice(4 * rank, 4 * rank + 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    loss, *_ = train_step(m, wrap_ddp(m, torch.device("cpu")), x1[mine], x2[mine], opt, scaler, 0.99, rank)
    mean = distributed.all_reduce_sum(loss) / 2
    # (2) real DDP steps in training mode: the queues (and weights) stay identical on both ranks
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=32)
    ddp = wrap_ddp(m, torch.device("cpu"))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)  # each rank sees different images
    from neighbour_monitor import NeighbourQuality
    quality = NeighbourQuality(torch.device("cpu"), sample_rows=2)
    for _ in range(3):
        labels = torch.randint(0, 3, (4,))
        _, w, same, _ = train_step(m, ddp, torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), opt, scaler,
                                   0.99, rank, labels=labels)
        quality.update(w, same)
    distributed.average_batchnorm_stats(m)
    torch.save({"mean": mean, "state": m.state_dict(), "quality": quality.summary()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


def test_two_process_gloo(tmp_path):
    from train import train_step
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    m, x1, x2 = _frozen_model_and_batch()  # the same step in this single process, on all 8 pairs
    single, *_ = train_step(m, m, x1, x2, torch.optim.SGD(m.parameters(), lr=0.0),
                              torch.amp.GradScaler("cpu", enabled=False), 0.99)
    for r in (r0, r1):
        assert r["mean"].item() == pytest.approx(single.item(), rel=1e-5)
    assert int(r0["state"]["queue.filled"]) == 3 * 8  # 3 steps x global batch 8
    assert (r0["state"]["queue.labels"][:24] >= 0).all()  # both ranks' labels, gathered beside the keys
    assert r0["quality"] == r1["quality"] and 0 <= r0["quality"]["nn_agree"] <= 1  # summed over ranks
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:  # weights (DDP), queue (same gathered keys), BN statistics (averaged)
        assert torch.allclose(r0["state"][key].float(), r1["state"][key].float(), atol=1e-6), key


# ------------------------------------------------------------- neighbour_monitor.py ---
def loop_auroc(scores, positive):
    """P(a positive outscores a negative), ties one half: every (positive, negative) pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_loop_and_analytic_cases():
    from neighbour_monitor import auroc
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(60, generator=g) * 5).round() / 5        # many ties
    positive = torch.rand(60, generator=g) < 0.4
    assert auroc(scores, positive) == pytest.approx(loop_auroc(scores.tolist(), positive.tolist()), abs=1e-12)
    ordered = torch.arange(10.0)
    assert auroc(ordered, ordered >= 5) == 1.0 and auroc(ordered, ordered < 5) == 0.0
    assert auroc(torch.full((10,), 0.2), ordered >= 5) == 0.5     # uniform w (hard, none): chance
    assert math.isnan(auroc(ordered, torch.ones(10, dtype=torch.bool)))


def test_neighbour_quality_matches_loop():
    from neighbour_monitor import NeighbourQuality
    g = torch.Generator().manual_seed(1)
    steps = [(torch.rand(6, 3, generator=g).softmax(1), torch.rand(6, 3, generator=g) < 0.5) for _ in range(3)]
    quality = NeighbourQuality(torch.device("cpu"), sample_rows=6)
    for w, same in steps:
        quality.update(w, same)
    quality.update(torch.empty(6, 0), torch.empty(6, 0, dtype=torch.bool))  # a step without neighbours
    got = quality.summary()
    pairs = [(float(w[r, i]), bool(same[r, i])) for w, same in steps for r in range(6) for i in range(3)]
    same_w = [w for w, s in pairs if s]
    other_w = [w for w, s in pairs if not s]
    assert got["nn_agree"] == pytest.approx(len(same_w) / len(pairs))
    assert got["nn_top1_agree"] == pytest.approx(sum(bool(s[r, 0]) for _, s in steps for r in range(6)) / 18)
    assert got["w_agree"] == pytest.approx(sum(same_w) / (sum(same_w) + sum(other_w)))
    assert got["w_same"] == pytest.approx(sum(same_w) / len(same_w))
    assert got["w_other"] == pytest.approx(sum(other_w) / len(other_w))
    assert got["w_auroc"] == pytest.approx(loop_auroc([w for w, _ in pairs], [s for _, s in pairs]))
    assert NeighbourQuality(torch.device("cpu")).summary() == {}


def test_train_step_marks_same_class_neighbours_and_the_loss_ignores_labels():
    from train import train_step
    results = []
    for labels in (torch.tensor([0, 1, 0, 1]), torch.tensor([5, 5, 5, 5])):
        torch.manual_seed(0)
        m = SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=16)
        m.queue.enqueue(unit(6, 16, seed=3), torch.tensor([0, 1, 0, 1, 0, 1]))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x1, x2 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), \
            torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        found = []
        search = m.queue.nearest_indices
        m.queue.nearest_indices = lambda q, k: found.append(search(q, k)) or found[-1]
        queue_labels = m.queue.labels.clone()
        loss, w, same, _ = train_step(m, m, x1, x2, opt, torch.amp.GradScaler("cpu", enabled=False), 0.99,
                                      labels=labels)
        idx1, idx2 = found                                    # view 1's w pairs with NN(k2), view 2's with NN(k1)
        expected = torch.cat([queue_labels[idx2], queue_labels[idx1]]) == labels.repeat(2)[:, None]
        assert torch.equal(same, expected) and w.shape == (8, 2)
        assert m.queue.labels[6:10].tolist() == labels.tolist()   # enqueued beside the view-2 keys
        results.append((loss.item(), [p.detach().clone() for p in m.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(params_a, params_b))


# ------------------------------------------------------------------------- train.py ---
SMOKE = ["--dataset", "fake", "--arch", "resnet18", "--image-size", "16", "--fake-size", "64",
         "--batch-size", "16", "--queue-size", "32", "-K", "2", "--dim", "16", "--mlp-dim", "32",
         "--workers", "0", "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0", "--device", "cpu"]


def run_cli(script, *args):
    return subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    res = run_cli("train.py", *SMOKE, "--epochs", "2", "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    (out / "stdout.txt").write_text(res.stdout)
    return out


def test_cli_smoke_writes_log_and_checkpoint(smoke_run):
    lines = [json.loads(line) for line in (smoke_run / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [0, 1, 2]
    assert all(0 <= e["knn_top1"] <= 100 for e in lines)
    assert all(math.isfinite(e["loss"]) and e["images_per_s"] > 0 for e in lines[1:])
    ckpt = torch.load(smoke_run / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "resnet18"
    assert int(ckpt["model"]["queue.filled"]) == 32
    assert json.loads((smoke_run / "args.json").read_text())["num_neighbors"] == 2
    summary = f"random init {lines[0]['knn_top1']:.2f}% -> after 2 epochs {lines[-1]['knn_top1']:.2f}%"
    assert summary in (smoke_run / "stdout.txt").read_text()


def test_vit_with_adamw_and_frozen_patch_embedding_trains(tmp_path):
    import train
    vit = [a if a != "resnet18" else "vit_tiny" for a in SMOKE]
    vit[vit.index("sgd")] = "adamw"
    train.main(vit + ["--lr", "1e-3", "--epochs", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    # the frozen patch embedding keeps its initial value (train.py seeds with --seed 0 before building)
    torch.manual_seed(0)
    assert torch.equal(state["backbone.conv_proj.weight"], SNCLR("vit_tiny", **TINY).backbone.conv_proj.weight)
    # and the layers that do train move away from their momentum (EMA) copies
    assert not torch.equal(state["backbone.encoder.layers.encoder_layer_0.mlp.0.weight"],
                           state["momentum_backbone.encoder.layers.encoder_layer_0.mlp.0.weight"])


def test_resume_equals_straight_run(tmp_path):
    import train
    train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "a")])
    train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "b"),
                        "--stop-after-epoch", "1"])
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_sigterm_saves_mid_epoch_and_resumes(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "train.py"), *SMOKE, "--fake-size", "256", "--epochs", "20",
           "--knn-every", "0", "--workers", "1", "--print-freq", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "log.txt").exists() and time.time() < deadline:  # random-init kNN done
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "SIGTERM: stopped" in stdout, stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    steps_done = 16 * ckpt["epoch"] + ckpt["step_in_epoch"]   # 16 steps per epoch
    assert 0 < steps_done < 16 * 20 and int(ckpt["model"]["queue.filled"]) == min(16 * steps_done, 32)
    finish = ckpt["epoch"] + 1                                 # resume and end after that epoch
    res = run_cli("train.py", *SMOKE, "--fake-size", "256", "--epochs", "20", "--knn-every", "0",
                  "--output-dir", str(out), "--stop-after-epoch", str(finish))
    assert res.returncode == 0, res.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["epoch"] == 0] == [0]    # no second "random init" line
    assert log[-1]["epoch"] == finish
    final = torch.load(out / "checkpoint.pth", weights_only=True)
    assert final["epoch"] == finish and final["step_in_epoch"] == 0
    assert final["knn_random_init"] == log[0]["knn_top1"]         # the baseline survives a resume


BAD_TRAIN_INPUT = [
    (["-K", "40"], "-K 40 must be in [0, --queue-size 32]"),
    (["--tau", "0"], "argument --tau: must be a finite number > 0.0, got 0"),
    (["--tau", "inf"], "argument --tau: must be a finite number > 0.0, got inf"),
    (["--batch-size", "0"], "argument --batch-size: must be a finite number > 0, got 0"),
    (["--batch-size", "-16"], "argument --batch-size: must be a finite number > 0, got -16"),
    (["--workers", "-1"], "argument --workers: must be a finite number >= 0, got -1"),
    (["--image-size", "0"], "argument --image-size: must be a finite number > 0, got 0"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0.0, got -1"),
    (["--stop-after-epoch", "-1"], "argument --stop-after-epoch: must be a finite number >= 0, got -1"),
    (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    (["--momentum", "1.5"], "--momentum (1.5) and --crop-min (0.2) must be at most 1"),
    (["--subset", "100000"], "--subset 100000 is larger than the data set (64 images)"),
    (["--knn-test-size", "999"], "--knn-test-size 999 is larger than the data set (16 images)"),
    (["--positiveness", "hard", "--positiveness-t", "0.5"], "--positiveness-t applies to --positiveness cosine"),
    (["--learn-gamma"], "--learn-gamma applies to --positiveness attention, not cosine"),
    (["--augment-device", "cuda"], "--augment-device cuda must be the training device (cpu); use "
                                   "--augment-device cpu or workers"),
    (["--dataset", "imagenet", "--data-path", "/nonexistent"], "/nonexistent/train"),
    (["--dataset", "fashion-mnist", "--data-path", "/nonexistent"], "dataset-fashion-mnist"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN_INPUT)
def test_cli_bad_input_fails_with_one_line(tmp_path, capsys, extra, message):
    """Each bad value: one `error:` line, a non-zero exit, and no output folder (in-process: fast)."""
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.main(SMOKE + extra + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code in (1, 2) and message in err, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_cli_bad_folders_fail_with_one_line(tmp_path, capsys):
    import train
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    cases = [(["--dataset", "folder", "--data-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")],
              "holds no images in class sub-folders"),
             (["--output-dir", str(tmp_path / "a_file")], "is a file, not a folder")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--output-dir", str(tmp_path / "o")], "no CUDA device is visible; "
                                                                                  "use --device cpu"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(SMOKE + argv)  # argparse: the last --device wins
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "o").exists() and (tmp_path / "a_file").read_text() == "keep me"


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    import train
    train.main(SMOKE + ["--epochs", "2", "--stop-after-epoch", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:   # resumes epoch 2 with an exploding learning rate
        train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--lr", "1e30", "--allow-changed-args",
                            "--output-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "error: loss is nan between step 4 and 7" in captured.err, captured.err
    assert "resumed with a changed option (--allow-changed-args): lr: 0.1 -> 1e+30" in captured.out
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_learning_rate_schedule_at_hand_computed_points():
    import train
    args = train.resolve_args(train.get_args_parser().parse_args(
        SMOKE + ["--lr", "0.4", "--batch-size", "512", "--queue-size", "512", "--epochs", "10",
                 "--warmup-epochs", "2"]))
    peak = 0.4 * 512 / 256                                              # 0.8: base lr x batch / 256
    steps = 5                                                           # per epoch
    assert train.learning_rate(0, steps, args) == 0.0
    assert train.learning_rate(5, steps, args) == pytest.approx(peak / 2)          # epoch 1 of 2 warm-up
    assert train.learning_rate(10, steps, args) == pytest.approx(peak)             # end of warm-up
    assert train.learning_rate(30, steps, args) == pytest.approx(peak / 2)         # cosine half way: 4 of 8
    assert train.learning_rate(20, steps, args) == pytest.approx(peak * (1 + math.cos(math.pi / 4)) / 2)
    assert train.learning_rate(50, steps, args) == pytest.approx(0.0, abs=1e-12)   # the end


def test_two_view_transforms_carry_the_asymmetric_probabilities():
    from torchvision import transforms
    from data import PILGaussianBlur, two_view_transforms

    def probs(view):
        blur = [t.p for t in view.transforms if isinstance(t, transforms.RandomApply)
                and isinstance(t.transforms[0], PILGaussianBlur)]
        solarize = [t.p for t in view.transforms if isinstance(t, transforms.RandomSolarize)]
        return blur, solarize

    view1, view2 = two_view_transforms("folder", 224, 0.2)
    assert probs(view1) == ([1.0], [0.0]) and probs(view2) == ([0.1], [0.2])
    small1, small2 = two_view_transforms("cifar10", 32, 0.2)
    assert probs(small1) == ([], [0.0]) and probs(small2) == ([], [0.2])   # no blur at <= 64 px
    crop = [t for t in view1.transforms if isinstance(t, transforms.RandomResizedCrop)][0]
    assert crop.scale == (0.2, 1.0) and crop.size == (224, 224)


def test_resnet_and_vit_defaults_follow_mocov3():
    import train
    resnet = train.resolve_args(train.get_args_parser().parse_args(["--arch", "resnet50"]))
    vit = train.resolve_args(train.get_args_parser().parse_args(["--arch", "vit_small"]))
    assert (resnet.crop_min, resnet.optimizer, resnet.lr, resnet.tau) == (0.2, "lars", 0.6, 1.0)
    assert (vit.crop_min, vit.optimizer, vit.lr, vit.tau) == (0.08, "adamw", 1.5e-4, 0.2)
    assert (resnet.knn_train_size, resnet.knn_test_size) == (100_000, 10_000)      # imagenet monitor subsets
    m = SNCLR("resnet18", **TINY, num_neighbors=0, queue_size=8)
    assert all(b.bn2.weight.abs().sum() == 0 for b in m.backbone.layer1)          # zero_init_residual
    v = SNCLR("vit_tiny", **TINY, num_neighbors=0, queue_size=8).backbone
    from model import sincos_position_embedding
    assert torch.equal(v.encoder.pos_embedding, sincos_position_embedding(4, 192))  # fixed, 16 px / 4
    assert not v.encoder.pos_embedding.requires_grad and v.class_token.abs().max() < 1e-5
    opt = train.build_optimizer(SNCLR("vit_tiny", **TINY, num_neighbors=0, queue_size=8), vit)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1  # AdamW decays all


def test_sincos_position_embedding_formula():
    from model import sincos_position_embedding
    pe = sincos_position_embedding(3, 8)                   # 3 x 3 patches, width 8: d = 2 frequencies
    assert pe.shape == (1, 10, 8) and torch.equal(pe[0, 0], torch.zeros(8))
    r, c = 1, 2                                            # token 1 + 3 r + c
    omega = [1.0, 1.0 / 10000 ** 0.5]
    expected = [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega] + \
        [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]
    assert pe[0, 1 + 3 * r + c].tolist() == pytest.approx(expected, abs=1e-6)


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_resume_with_changed_options_is_refused_or_logged(smoke_run, tmp_path, capsys):
    import train
    run = copy_run(smoke_run, tmp_path / "run")
    before = (run / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "3", "--lr", "0.2", "--tau", "0.5", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert "lr: 0.1 -> 0.2; tau: 1.0 -> 0.5" in err and "--allow-changed-args" in err, err
    assert err.count("\n") == 1 and (run / "checkpoint.pth").read_bytes() == before
    # options that only change output, monitoring or the length of the run resume freely
    train.main(SMOKE + ["--epochs", "3", "--stop-after-epoch", "2", "--workers", "1", "--knn-every", "0",
                        "--output-dir", str(run)])
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 2
    train.main(SMOKE + ["--epochs", "3", "--lr", "0.2", "--allow-changed-args", "--knn-every", "0",
                        "--output-dir", str(run)])
    out = capsys.readouterr().out
    assert "resumed with a changed option (--allow-changed-args): lr: 0.1 -> 0.2" in out
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert {"epoch": 3, "changed_args": ["lr: 0.1 -> 0.2"]} in log and log[-1]["epoch"] == 3  # from epoch 3 on
    from checkpoint import read_log
    merged = read_log(run / "log.txt")                    # one entry per epoch, lines merged
    assert [e["epoch"] for e in merged] == [0, 1, 2, 3] and {"loss", "changed_args"} <= set(merged[3])
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["runtime"] == {"device": "cpu", "augment": "workers"} and ckpt["world_size"] == 1
    ckpt["runtime"]["augment"] = "cuda"                   # as if written by a GPU run: noticed on resume
    torch.save(ckpt, run / "checkpoint.pth")
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "4", "--lr", "0.2", "--output-dir", str(run)])
    assert "augment: 'cuda' -> 'workers'" in capsys.readouterr().err


def test_mid_epoch_resume_with_another_batch_or_world_size_is_refused(smoke_run, tmp_path, capsys):
    import train
    run = copy_run(smoke_run, tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    ckpt.update(epoch=1, step_in_epoch=2)                  # as if SIGTERM stopped epoch 2 at step 2
    torch.save(ckpt, run / "checkpoint.pth")
    with pytest.raises(SystemExit):                        # even with --allow-changed-args
        train.main(SMOKE + ["--epochs", "2", "--batch-size", "8", "--allow-changed-args", "--output-dir", str(run)])
    assert "a mid-epoch resume needs the same batch size and number of processes" in capsys.readouterr().err
    ckpt["world_size"] = 2
    torch.save(ckpt, run / "checkpoint.pth")
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "2", "--output-dir", str(run)])
    assert "--batch-size 16 on 2 processes" in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_is_refused_and_a_dead_runs_lock_is_not(tmp_path, capsys):
    import signal
    import train
    from checkpoint import RunLock
    lock = RunLock(str(tmp_path))                          # a run in progress holds the folder
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "1", "--output-dir", str(tmp_path)])
    assert f"{tmp_path} is in use by a running training (pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "log.txt").exists()
    lock.release()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(HERE)!r}); "
                               f"from checkpoint import RunLock; RunLock({str(tmp_path)!r}); print(1, flush=True); "
                               f"time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    holder.send_signal(signal.SIGKILL)                     # a crashed run: the OS releases its flock
    holder.wait()
    RunLock(str(tmp_path)).release()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_keeps_the_log_line_and_leaves_no_partial_file(tmp_path, capsys):
    import train
    from checkpoint import ConfigError, save_checkpoint
    (tmp_path / "checkpoint.pth.tmp").symlink_to("/dev/full")   # every write to the .tmp: ENOSPC
    with pytest.raises(ConfigError, match=f"no space left on {tmp_path}: saving checkpoint.pth needs about"):
        save_checkpoint(str(tmp_path / "checkpoint.pth"), {"x": torch.zeros(1000)})
    assert not os.path.lexists(tmp_path / "checkpoint.pth.tmp")
    (tmp_path / "checkpoint.pth.tmp").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as exit_info:
        train.main(SMOKE + ["--epochs", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "error: no space left on" in err and err.count("\n") == 1, err
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1] and "loss" in log[1]     # the epoch's figures are kept
    assert not os.path.lexists(tmp_path / "checkpoint.pth.tmp") and not (tmp_path / "checkpoint.pth").exists()


def jpeg_folder(root, per_class=4, size=20):
    from PIL import Image
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def test_unreadable_training_images_are_skipped_and_counted_or_named(tmp_path, capsys):
    import train
    data = jpeg_folder(tmp_path / "data")
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    common = [*SMOKE, "--dataset", "folder", "--data-path", str(data), "--batch-size", "4", "--queue-size", "8",
              "--epochs", "1", "--knn-every", "0"]
    train.main(common + ["--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert f"warning: skipping unreadable training image {data}/train/a/broken.jpg" in captured.err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert log[1]["skipped_images"] >= 1
    with pytest.raises(SystemExit):
        train.main(common + ["--strict-data", "--output-dir", str(tmp_path / "strict")])
    err = capsys.readouterr().err
    assert f"error: cannot read image {data}/train/a/broken.jpg" in err and err.count("\n") == 1, err
    (data / "train" / "a" / "broken.jpg").unlink()
    (data / "val" / "b" / "0.jpg").write_bytes(b"truncated")       # a test image: always an error
    with pytest.raises(SystemExit):
        train.main(common + ["--output-dir", str(tmp_path / "val")])
    assert f"error: cannot read image {data}/val/b/0.jpg" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the monitor's worker in /proc (Linux)")
def test_sigterm_to_the_process_group_during_the_monitor_exits_143(tmp_path):
    """As SLURM or torchrun send it: to every process, the monitor's DataLoader workers too
    (they ignore it; the main process stops the monitor, keeps the saved epoch, exits 143)."""
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "train.py"), *SMOKE, "--fake-size", "512", "--batch-size", "64",
           "--queue-size", "128", "--epochs", "3", "--workers", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    def workers_ignoring_sigterm():  # DataLoader workers that have run their worker_init_fn
        pids = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        try:
            masks = [next(line for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("SigIgn")) for pid in pids]
        except (OSError, StopIteration):
            return 0
        return sum(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1 for mask in masks)

    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "checkpoint.pth").exists()  # epoch 1 saved, and its monitor's
                                          and workers_ignoring_sigterm() >= 2):  # worker beside the training one
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "SIGTERM: stopped after epoch 1" in stdout, (stdout[-2000:], stderr[-2000:])
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[-1]["epoch"] == 1 and log[-1].get("knn_interrupted") and "knn_top1" not in log[-1]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_truncated_idx_file_names_the_file(tmp_path):
    import gzip
    from data import DataError, read_idx
    with gzip.open(tmp_path / "x-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(5))
    assert read_idx(str(tmp_path / "x-idx1-ubyte.gz")).tolist() == [0] * 5
    whole = (tmp_path / "x-idx1-ubyte.gz").read_bytes()
    (tmp_path / "cut-idx1-ubyte.gz").write_bytes(whole[:-12])           # the gzip stream cut short
    with pytest.raises(DataError, match="cut-idx1-ubyte.gz"):
        read_idx(str(tmp_path / "cut-idx1-ubyte.gz"))
    with open(tmp_path / "short-idx1-ubyte", "wb") as f:                # the header promises more bytes
        f.write(bytes([0, 0, 8, 1]) + (9).to_bytes(4, "big") + bytes(5))
    with pytest.raises(DataError, match="short-idx1-ubyte holds 5 bytes of data but its header promises"):
        read_idx(str(tmp_path / "short-idx1-ubyte"))


def test_sigterm_during_the_knn_monitor_keeps_the_saved_epoch(tmp_path, monkeypatch, capsys):
    """The epoch's checkpoint is written before its monitor; a SIGTERM (the handler sets the stop
    event) arriving during the monitor stops it promptly and the run exits 143."""
    import train
    calls = []

    def monitor_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:                               # the monitor after epoch 1, not the random-init one
            assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
            kwargs["stop"].set()
        return knn_accuracy(*args, **kwargs)

    from knn import knn_accuracy
    monkeypatch.setattr(train, "knn_accuracy", monitor_then_sigterm)
    with pytest.raises(SystemExit) as exit_info:
        train.main(SMOKE + ["--epochs", "2", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 143 and "SIGTERM: stopped after epoch 1" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert log[-1]["epoch"] == 1 and log[-1]["knn_interrupted"] and "knn_top1" not in log[-1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0


def test_resident_batches_follow_the_samplers_epoch_order():
    from data import EpochSampler
    from loaders import ResidentImages
    n, batch = 40, 4
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()
    sampler = EpochSampler(torch.utils.data.DistributedSampler(range(n), 2, 1, shuffle=True, seed=5, drop_last=True))
    sampler.set_epoch(3, skip=2 * batch)                     # a resumed epoch: two batches already done
    order = list(sampler)
    got = [(x[:, 0, 0, 0].tolist(), y.tolist()) for x, y in ResidentImages(images, torch.arange(n), sampler, batch)]
    assert [x for x, _ in got] == [y for _, y in got] == [order[i:i + batch] for i in range(0, 12, batch)]


def test_mid_epoch_resume_on_the_device_path_is_bit_exact(tmp_path, monkeypatch):
    """--augment-device cpu (the training set held on the device, augment.py): a run stopped
    inside epoch 1 and resumed ends with the same weights, queue and statistics as a straight run."""
    import train
    common = SMOKE + ["--epochs", "2", "--knn-every", "0", "--augment-device", "cpu"]
    train.main(common + ["--output-dir", str(tmp_path / "straight")])
    poll, polls = distributed.StopAgreement.poll, []

    def sigterm_during_step_2(self):                     # as if SIGTERM had arrived during step 2
        polls.append(1)
        return poll(self) or len(polls) == 2

    monkeypatch.setattr(distributed.StopAgreement, "poll", sigterm_during_step_2)
    with pytest.raises(SystemExit, match="143"):
        train.main(common + ["--output-dir", str(tmp_path / "resumed")])
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["step_in_epoch"] == 2
    monkeypatch.setattr(distributed.StopAgreement, "poll", poll)
    train.main(common + ["--output-dir", str(tmp_path / "resumed")])
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_a_resident_set_too_large_for_the_gpu_is_refused_with_the_option_to_use(monkeypatch):
    from data import DataError
    from loaders import check_fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**20, 80 * 2**30))  # 3 MiB free
    check_fits(torch.zeros(2**20, dtype=torch.uint8), torch.device("cuda", 0))           # 1 MiB: fits
    with pytest.raises(DataError, match="more than half of the 0.0 GiB free on cuda:0; use --augment-device workers"):
        check_fits(torch.zeros(2 * 2**20, dtype=torch.uint8), torch.device("cuda", 0))
    check_fits(torch.zeros(2 * 2**20, dtype=torch.uint8), torch.device("cpu"))           # host memory: no check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks CUDA synchronisation: needs a GPU")
def test_train_step_and_batched_views_never_wait_for_the_gpu():
    """torch.cuda.set_sync_debug_mode("error") raises at any host-device synchronisation
    (.item(), nonzero, a blocking copy): none in the batched path (resident images, crop and
    crop-free views with blur), train_step, Progress.add or NeighbourQuality.update."""
    import augment
    from data import EpochSampler
    from loaders import DeviceAugmented, ResidentImages
    from neighbour_monitor import NeighbourQuality
    from progress import Progress
    from train import get_args_parser, resolve_args, train_step
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = SNCLR("resnet18", 32, dim=16, mlp_dim=32, num_neighbors=2, queue_size=64).to(dev)
    m.queue.enqueue(torch.randn(64, 16, device=dev), torch.randint(0, 10, (64,), device=dev))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    images, labels = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=dev), \
        torch.randint(0, 10, (64,), device=dev)
    sampler = EpochSampler(torch.utils.data.DistributedSampler(range(64), 1, 0, seed=0, drop_last=True))
    views = DeviceAugmented(ResidentImages(images, labels, sampler, 16), sampler, dev, 32, 0.2,
                            ((0.5,) * 3, (0.25,) * 3), 0, 0, crop=True, batch=16)
    args = resolve_args(get_args_parser().parse_args(SMOKE))
    env = distributed.Env(0, 1, dev)
    progress, quality = Progress(args, env, 0, 0, 4), NeighbourQuality(dev)
    big = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev)
    for strict in (False, True):                           # a warm-up pass first (cuDNN, allocator)
        sampler.set_epoch(int(strict))
        torch.cuda.set_sync_debug_mode("error" if strict else "default")
        try:
            for (x1, x2), y in views:                       # the epoch's order: one copy before the loop
                loss, w, same, _ = train_step(m, m, x1, x2, opt, scaler, 0.99, labels=y)
                progress.add(loss, w, None, 0.0)
                quality.update(w, same)
            g.manual_seed(1)
            augment.two_views([big, big], 96, 0.2, (0.5,) * 3, (0.25,) * 3, g, crop=False)  # with blur
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_pil_path_batches_do_not_depend_on_the_number_of_workers():
    import train
    from loaders import build_train_loader
    batches = []
    for workers in ("0", "2"):
        args = train.resolve_args(train.get_args_parser().parse_args(SMOKE + ["--workers", workers]))
        loader = build_train_loader(args, distributed.Env(0, 1, torch.device("cpu")), "workers")
        loader.set_epoch(1)
        batches.append(next(iter(loader)))
    ((a1, a2), ya), ((b1, b2), yb) = batches
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ya, yb) and not torch.equal(a1, a2)


def test_batch_must_divide_by_world_size():
    import train
    args = train.resolve_args(train.get_args_parser().parse_args(SMOKE))
    cpu = torch.device("cpu")
    train.check_args(args, distributed.Env(0, 4, cpu))  # 16 = 4 x 4
    with pytest.raises(train.ConfigError, match="--batch-size 16 is not divisible by the world size 3"):
        train.check_args(args, distributed.Env(0, 3, cpu))


def test_cli_refuses_checkpoint_of_another_arch(smoke_run, capsys):
    import train
    before = (smoke_run / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--arch", "resnet34", "--epochs", "3", "--output-dir", str(smoke_run)])
    assert "arch: 'resnet18' -> 'resnet34'" in capsys.readouterr().err
    assert (smoke_run / "checkpoint.pth").read_bytes() == before


# -------------------------------------------------------------------- eval_linear.py ---
def test_eval_linear_and_knn_on_smoke_checkpoint(smoke_run, tmp_path):
    import eval_linear
    ckpt = str(smoke_run / "checkpoint.pth")
    common = ["--batch-size", "32", "--workers", "0", "--device", "cpu"]
    probe = eval_linear.main([ckpt, "--epochs", "2", "--output-dir", str(tmp_path / "lin"), *common])
    knn = eval_linear.main([ckpt, "--knn", "--output-dir", str(tmp_path / "knn"), *common])
    rand = eval_linear.main([ckpt, "--knn", "--random-init", "--output-dir", str(tmp_path / "rnd"), *common])
    for r in (probe, knn, rand):
        assert math.isfinite(r["top1"]) and 0 <= r["top1"] <= 100
    assert 0 <= probe["top1"] <= probe["top5"] <= 100
    assert (tmp_path / "lin" / "best.pth").exists() and (tmp_path / "lin" / "checkpoint.pth").exists()
    saved = json.loads((tmp_path / "knn" / "results.txt").read_text().splitlines()[-1])
    assert saved["top1"] == knn["top1"] and saved["mode"] == "knn"
    # the checkpoint's --fake-size 64 (16 test images), not build_dataset's default 512
    assert (probe["train_images"], probe["test_images"]) == (64, 16)


def test_eval_knn_equals_the_monitor_of_the_last_epoch(smoke_run, tmp_path):
    import eval_linear
    logged = json.loads((smoke_run / "log.txt").read_text().splitlines()[-1])
    result = eval_linear.main([str(smoke_run / "checkpoint.pth"), "--knn", "--workers", "0", "--device", "cpu",
                               "--output-dir", str(tmp_path)])
    assert result["top1"] == logged["knn_top1"] and logged["epoch"] == result["pretrain_epoch"] == 2


def test_probe_separates_a_separable_set_and_keeps_backbone_frozen(tmp_path):
    import eval_linear
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    centers = 3 * torch.randn(4, 3, 2, 2, generator=g)
    x = centers[y] + 0.3 * torch.randn(200, 3, 2, 2, generator=g)       # 4 well-separated blobs
    data = torch.utils.data.TensorDataset(x, y)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16))
    args = eval_linear.get_args_parser().parse_args(["unused", "--epochs", "20", "--batch-size", "32",
                                                     "--workers", "0"])
    env = distributed.Env(0, 1, torch.device("cpu"))
    top1, top5, best = eval_linear.train_classifier(backbone, 16, 4, data, data, args, env, 0.5, False, str(tmp_path))
    assert top1 > 95 and best >= top1 and top5 == 100


def test_backbone_unchanged_check_fails_when_modified():
    import eval_linear
    net, _ = build_backbone("resnet18", 16)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    eval_linear.check_backbone_unchanged(net, reference)
    net.bn1.running_mean += 1e-3
    with pytest.raises(RuntimeError, match="bn1.running_mean"):
        eval_linear.check_backbone_unchanged(net, reference)


def fake_checkpoint(path, arch, image_size, stem):
    m = SNCLR(arch, image_size, dim=16, mlp_dim=32, num_neighbors=0, queue_size=8, stem=stem)
    args = dict(arch=arch, image_size=image_size, stem=stem, dataset="fake", data_path="data")
    torch.save({"model": m.state_dict(), "optimizer": {}, "epoch": 1, "args": args}, path)
    return str(path)


@pytest.mark.parametrize("arch, size, stem, make", [
    ("resnet18", 32, "imagenet", lambda: __import__("torchvision").models.resnet18()),
    ("vit_tiny", 32, "imagenet", lambda: __import__("torchvision").models.VisionTransformer(32, 16, 12, 3, 192, 768)),
    ("vit_tiny", 16, "small", lambda: __import__("torchvision").models.VisionTransformer(16, 4, 12, 3, 192, 768)),
])
def test_export_loads_into_torchvision(tmp_path, arch, size, stem, make):
    import eval_linear
    ckpt = fake_checkpoint(tmp_path / "c.pth", arch, size, stem)
    eval_linear.main([ckpt, "--export", str(tmp_path / "e.pth")])
    state = torch.load(tmp_path / "e.pth", weights_only=True)
    res = make().load_state_dict(state, strict=False)
    assert not res.unexpected_keys
    assert sorted(res.missing_keys) == (["fc.bias", "fc.weight"] if arch.startswith("resnet")
                                        else ["heads.head.bias", "heads.head.weight"])


def test_export_of_small_stem_loads_after_the_same_stem_change(smoke_run, tmp_path):
    import torchvision
    import eval_linear
    eval_linear.main([str(smoke_run / "checkpoint.pth"), "--export", str(tmp_path / "e.pth")])
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    res = net.load_state_dict(torch.load(tmp_path / "e.pth", weights_only=True), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys


def fails_in_process(capsys, main, argv, status=None) -> str:
    """Run main(argv) in this process; it must exit non-zero (or with `status`) after one
    `error: ...` line on stderr. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and (status is None or exit_.value.code == status), (argv, exit_.value.code)
    assert err.startswith("error: ") and err.strip().count("\n") == 0, (argv, err)
    return err


def test_eval_export_never_overwrites_its_checkpoint_and_needs_force(tmp_path, capsys):
    import eval_linear
    ckpt = fake_checkpoint(tmp_path / "c.pth", "resnet18", 16, "small")
    before = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "link.pth").symlink_to(tmp_path / "c.pth")
    for target in ("c.pth", "link.pth", "./sub/../c.pth"):
        for force in ([], ["--force"]):
            err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / target), *force])
            assert "is the checkpoint being exported" in err
    assert (tmp_path / "c.pth").read_bytes() == before
    (tmp_path / "e.pth").write_bytes(b"keep me")
    err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / "e.pth")])
    assert "exists; add --force to replace it" in err and (tmp_path / "e.pth").read_bytes() == b"keep me"
    eval_linear.main([ckpt, "--export", str(tmp_path / "e.pth"), "--force"])
    assert "conv1.weight" in torch.load(tmp_path / "e.pth", weights_only=True)
    (tmp_path / "folder").mkdir()
    err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / "none" / "e.pth")])
    assert "does not exist" in err and not (tmp_path / "none").exists()
    err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / "folder"), "--force"])
    assert "is a folder" in err and not any((tmp_path / "folder").iterdir())
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "c.pth").read_bytes() == before


def test_eval_bad_input(smoke_run, tmp_path, capsys):
    import eval_linear
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    (tmp_path / "list.txt").write_text("n01440764_10026.JPEG\n")
    (tmp_path / "a_file").write_text("")
    ckpt = str(smoke_run / "checkpoint.pth")
    usage = [(["--batch-size", "0"], "argument --batch-size: must be a finite number > 0, got 0"),
             (["--batch-size", "-8"], "argument --batch-size: must be a finite number > 0, got -8"),
             (["--epochs", "0"], "argument --epochs: must be a finite number > 0, got 0"),
             (["--workers", "-1"], "argument --workers: must be a finite number >= 0, got -1"),
             (["--lr", "-1"], "argument --lr: must be a finite number > 0.0, got -1"),
             (["--lr", "inf"], "argument --lr: must be a finite number > 0.0, got inf"),
             (["--knn", "--knn-k", "0"], "argument --knn-k: must be a finite number > 0, got 0"),
             (["--knn", "--knn-t", "0"], "argument --knn-t: must be a finite number > 0.0, got 0"),
             (["--train-percent", "5"], "must be 1 or 10"),
             (["--dataset", "mnist"], "invalid choice: 'mnist'")]
    for argv, message in usage:
        assert message in fails_in_process(capsys, eval_linear.main, [ckpt, *argv], status=2), argv
    out = str(tmp_path / "o")
    cases = [([str(tmp_path / "corrupt.pth")], "cannot read checkpoint"),
             ([str(tmp_path / "other.pth")], "is not a checkpoint of this project"),
             ([str(smoke_run)], f"checkpoint {smoke_run} is a directory"),
             ([ckpt, "--arch", "vit_small"], "arch='resnet18' but arch='vit_small'"),
             ([ckpt, "--train-percent", "1", "--knn"], "--knn and --train-percent are different evaluations"),
             ([ckpt, "--cache-features", "--export", str(tmp_path / "e.pth")], "are different evaluations"),
             ([ckpt, "--knn-k", "5"], "--knn-k applies to --knn only"),
             ([ckpt, "--force"], "--force applies to --export only"),
             ([ckpt, "--subset-list", str(tmp_path / "list.txt")], "--subset-list applies to --train-percent"),
             ([ckpt, "--train-percent", "1", "--subset-list", str(tmp_path / "none.txt")], "none.txt: no such file"),
             ([ckpt, "--train-percent", "1", "--subset-list", str(tmp_path / "list.txt")],
              "--subset-list needs an image-folder dataset"),
             ([ckpt, "--knn", "--knn-train-size", "65"], "--knn-train-size 65 is larger than the data set (64")]
    for argv, message in cases:
        assert message in fails_in_process(capsys, eval_linear.main, [*argv, "--workers", "0", "--output-dir", out])
        assert not (tmp_path / "o").exists(), argv
    for folder, message in [(tmp_path / "a_file", "is a file, not a folder"),
                            (tmp_path / "a_file" / "sub", "a_file is a file"),
                            (smoke_run, "holds a train.py run")]:
        err = fails_in_process(capsys, eval_linear.main, [ckpt, "--knn", "--output-dir", str(folder)])
        assert message in err, err
    assert (tmp_path / "a_file").read_text() == "" and not (smoke_run / "results.txt").exists()
    # a real process: torch's advice about weights_only=False (unsafe) and its warnings stay out
    res = run_cli("eval_linear.py", str(tmp_path / "corrupt.pth"), "--output-dir", out)
    assert res.returncode == 1 and res.stderr.startswith("error: cannot read checkpoint"), res.stderr
    assert res.stderr.strip().count("\n") == 0 and "weights_only" not in res.stderr, res.stderr


def test_eval_errors_are_printed_by_rank_0_only(smoke_run, monkeypatch, capsys):
    import eval_linear
    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    for argv, status in [(["--batch-size", "0"], 2), (["--arch", "vit_small"], 1)]:
        with pytest.raises(SystemExit) as exit_:
            eval_linear.main([str(smoke_run / "checkpoint.pth"), *argv, "--device", "cpu"])
        assert exit_.value.code == status and capsys.readouterr().err == ""


def test_eval_data_path_of_an_older_checkpoint(tmp_path):
    import eval_linear
    from checkpoint import ConfigError
    ckpt = str(tmp_path / "runs" / "checkpoint.pth")
    old = {"dataset": "cifar10", "data_path": "data"}
    with pytest.raises(ConfigError, match="relative data path 'data'.*give --data-path"):
        eval_linear.checkpoint_data_path(ckpt, old)
    (tmp_path / "data").mkdir()  # train.py ran in tmp_path with --output-dir runs
    assert eval_linear.checkpoint_data_path(ckpt, old) == str(tmp_path / "data")
    assert eval_linear.checkpoint_data_path(ckpt, old, "/given") == "/given"
    assert eval_linear.checkpoint_data_path(ckpt, {"dataset": "cifar10", "data_path": "/abs"}) == "/abs"


# ---------------------------------------------------------------- visualize.py ---
def test_visualize_calibration_on_smoke_checkpoint(smoke_run, tmp_path, capsys):
    from PIL import Image
    import visualize
    out = tmp_path / "calibration.png"
    visualize.main(["calibration", str(smoke_run / "checkpoint.pth"), "--out", str(out), "--workers", "0"])
    line = capsys.readouterr().out
    assert "K=2, 16 queries x 2 neighbours in a bank of 64" in line and "AUROC " in line, line
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (760, 460)


def test_visualize_calibration_figures():
    import visualize
    from neighbour_monitor import auroc
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.3]])
    same = torch.tensor([[True, False, False], [True, True, False]])
    f = visualize.calibration_figures(w, same)
    assert (f["same"], f["other"]) == (3, 3)
    assert f["w_same"] == pytest.approx(1.4 / 3) and f["w_other"] == pytest.approx(0.8 / 3)
    # same {0.5, 0.6, 0.3} beats other {0.3, 0.2, 0.3} in 3 + 3 + (0.5 + 1 + 0.5) of 9 pairs (a tie counts 1/2)
    assert f["auroc"] == auroc(w.flatten(), same.flatten()) == pytest.approx(8 / 9)
    assert visualize.calibration_figures(w, torch.ones_like(same))["auroc"] is None


def test_visualize_neighbours_and_curves_on_smoke_run(smoke_run, tmp_path, capsys):
    from PIL import Image
    import visualize
    visualize.main(["neighbours", str(smoke_run / "checkpoint.pth"), "--out", str(tmp_path / "n.png"),
                    "--queries", "3", "--workers", "0"])
    assert "3 queries x 2 neighbours" in capsys.readouterr().out
    visualize.main(["curves", str(smoke_run / "log.txt"), "--out", str(tmp_path / "c.png")])
    with Image.open(tmp_path / "c.png") as img:  # the smoke log has nn_agree / w_agree: a third panel
        assert img.format == "PNG" and img.size == (1360, 350)


def test_visualize_bad_input_fails_with_one_line(smoke_run, tmp_path, capsys):
    import visualize
    ckpt, out = str(smoke_run / "checkpoint.pth"), str(tmp_path / "p.png")
    (tmp_path / "empty.txt").write_text("")
    cases = [(["calibration", str(tmp_path / "none.pth"), "--out", out], 1, "none.pth: no such file"),
             (["calibration", str(smoke_run), "--out", out], 1, "is a directory"),
             (["calibration", ckpt, "--queries", "0"], 2, "argument --queries: must be a finite number > 0"),
             (["neighbours", ckpt, "-K", "0"], 2, "argument -K: must be a finite number > 0"),
             (["calibration", ckpt, "--bank-size", "-1"], 2, "argument --bank-size: must be a finite number >= 0"),
             (["calibration", ckpt, "--queries", "17", "--workers", "0", "--out", out], 1,
              "--queries 17 is more than the 16 test images"),
             (["calibration", ckpt, "-K", "65", "--workers", "0", "--out", out], 1, "-K 65 is more than the 64"),
             (["calibration", ckpt, "--out", str(tmp_path / "none" / "p.png")], 1, "does not exist"),
             (["calibration", ckpt, "--out", str(tmp_path / "p.txt")], 1, "Pillow cannot write a .txt file"),
             (["curves", str(tmp_path / "log.txt"), "--out", out], 1, "log.txt: no such file"),
             (["curves", str(tmp_path / "empty.txt"), "--out", out], 1, "has no training epochs yet"),
             (["curves", ckpt, "--out", out], 1, "is not a train.py log.txt"),
             (["curves"], 2, "the following arguments are required: log")]
    for argv, status, message in cases:
        assert message in fails_in_process(capsys, visualize.main, argv, status), argv
    assert not list(tmp_path.glob("p.*"))


# ----------------------------------------------------------------------------- data ---
def test_fashion_mnist_reads_idx_gz_files(tmp_path):
    import gzip
    from data import FashionMNIST
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    for prefix in ("train", "t10k"):  # IDX: 0, 0, type 0x08 (ubyte), ndim, big-endian sizes, data
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (5, 28, 28))
                    + images.numpy().tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + labels.numpy().tobytes())
    ds = FashionMNIST(str(tmp_path), train=True)
    img, y = ds[2]
    assert len(ds) == 5 and y == 4 and img.size == (28, 28)
    assert torch.equal(torch.tensor(np.array(img)), images[2])


def test_epoch_sampler_skips_the_trained_part_of_the_same_order():
    from data import EpochSampler
    base = torch.utils.data.DistributedSampler(list(range(20)), num_replicas=2, rank=1, shuffle=True, seed=3)
    s = EpochSampler(base)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, skip=3)
    assert list(s) == full[3:] and len(s) == len(full) - 3
    s.set_epoch(5)
    assert list(s) != full and len(s) == len(full)  # a new epoch reshuffles, and skips nothing


def test_balanced_subset_takes_the_same_share_of_every_class():
    from eval_linear import balanced_subset
    labels = [0] * 300 + [1] * 100 + [2] * 50
    chosen = balanced_subset(labels, 10, seed=0)
    counts = [sum(labels[i] == c for i in chosen) for c in range(3)]
    assert counts == [30, 10, 5] and len(set(chosen)) == 45
    assert balanced_subset(labels, 10, seed=0) == chosen != balanced_subset(labels, 10, seed=1)
    assert [sum(labels[i] == c for i in balanced_subset(labels, 1, seed=0)) for c in range(3)] == [3, 1, 1]


# ----------------------------------------------------------------------- knn.py ---
def loop_knn_scores(bank, labels, queries, num_classes, k, t):
    """InstDisc's vote written out: the k most cosine-similar bank items vote exp(cos / t)."""
    out = []
    for q in queries:
        sims = sorted(((cos(q, bank[j]), int(labels[j])) for j in range(bank.shape[0])), reverse=True)
        scores = [0.0] * num_classes
        for s, c in sims[:k]:  # k larger than the bank: every item votes
            scores[c] += math.exp(s / t)
        out.append(scores)
    return torch.tensor(out)


@pytest.mark.parametrize("k", [1, 4, 30, 50])
def test_knn_predict_matches_loop(k):
    from knn import knn_predict
    bank, queries = unit(30, 8, seed=1), unit(9, 8, seed=2)
    labels = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(3))
    got = knn_predict(bank, labels, queries, 4, k, 0.07, chunk=4)  # chunk < n_test: 3 chunks
    assert torch.allclose(got, loop_knn_scores(bank, labels, queries, 4, k, 0.07).float(), rtol=1e-5)


def test_knn_k1_votes_for_the_nearest_item_only():
    from knn import knn_predict
    bank = torch.eye(6)                                     # orthonormal: cos(e_i, e_j) = [i = j]
    labels = torch.tensor([3, 0, 2, 1, 3, 2])
    queries = F.normalize(torch.eye(6) + 0.1 * torch.ones(6, 6), dim=1)   # nearest item: its own
    scores = knn_predict(bank, labels, queries, 4, k=1, t=0.07)
    assert torch.equal(scores.argmax(dim=1), labels)
    assert torch.equal(scores > 0, F.one_hot(labels, 4).bool())          # one vote, one class
    assert torch.allclose(scores.max(dim=1).values, (queries.diagonal() / 0.07).exp())


def _knn_sets():
    """Train / test TensorDatasets with 37 / 23 items (odd: one shard of each is padded), 5
    classes as noisy centres, so neighbours carry information."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 48, generator=g)
    def make(n):
        y = torch.randint(0, 5, (n,), generator=g)
        x = centres[y] + 2 * torch.randn(n, 48, generator=g)
        return torch.utils.data.TensorDataset(x.view(n, 3, 4, 4), y)
    return make(37), make(23)


class _CountingFlatten(torch.nn.Flatten):
    """Flatten (deterministic features) that counts its calls and may set an event at call n."""
    def __init__(self, event=None, set_at=None):
        super().__init__()
        self.calls, self.event, self.set_at = 0, event, set_at

    def forward(self, x):
        self.calls += 1
        if self.event is not None and self.calls == self.set_at:
            self.event.set()
        return super().forward(x)


def _knn_two_rank_worker(rank, port, out_dir):
    import threading
    from knn import encode_shard, knn_accuracy, sharded_knn_predict
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = distributed.init_distributed("cpu")
    train_set, test_set = _knn_sets()
    args = (4, 0, env.device, rank, 2)                      # batches of 4: 5 per rank for the bank
    bank = encode_shard(torch.nn.Flatten(), train_set, *args)
    test = encode_shard(torch.nn.Flatten(), test_set, *args)
    out = {"bank_rows": bank.real, "bank_index": bank.index[:bank.real], "test_index": test.index[:test.real],
           "acc": {k: knn_accuracy(torch.nn.Flatten(), train_set, test_set, 5, *args, k=k) for k in (5, 100)},
           "scores": sharded_knn_predict(bank.feats[:bank.real], bank.labels[:bank.real],
                                         distributed.all_gather(test.feats), 5, 100)[:test.real]}
    # the bank as its own queries, k = 1: each item finds itself; a padded query counted twice would give 38/37
    out["self"] = knn_accuracy(torch.nn.Flatten(), train_set, train_set, 5, *args, k=1)
    stop, net = threading.Event(), _CountingFlatten()
    if rank == 1:                                           # SIGTERM on one rank only: both stop
        stop.set()
    out["stopped"], out["calls"] = knn_accuracy(net, train_set, test_set, 5, *args, stop=stop), net.calls
    # SIGTERM on rank 1 during its 2nd bank batch: the ranks next agree before the first test
    # batch (checks every 10 batches), so both encode the 5 bank batches and stop there
    stop = threading.Event()
    net = _CountingFlatten(stop, set_at=2) if rank == 1 else _CountingFlatten()
    out["stopped_late"], out["calls_late"] = knn_accuracy(net, train_set, test_set, 5, *args, stop=stop), net.calls
    torch.save(out, os.path.join(out_dir, f"knn{rank}.pt"))
    distributed.cleanup()


def test_knn_sharded_two_process_gloo_equals_single_device(tmp_path):
    from knn import knn_predict
    mp.spawn(_knn_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"knn{r}.pt", weights_only=True) for r in range(2))
    train_set, test_set = _knn_sets()
    (x, y), (xq, yq) = train_set.tensors, test_set.tensors
    bank, queries = F.normalize(x.flatten(1), dim=1), F.normalize(xq.flatten(1), dim=1)
    # each rank keeps about half of the bank, padding dropped: 19 + 18 distinct items
    assert (r0["bank_rows"], r1["bank_rows"]) == (19, 18)
    assert sorted(torch.cat([r0["bank_index"], r1["bank_index"]]).tolist()) == list(range(37))
    for k in (5, 100):                                      # k = 100 > 37: every item votes once
        single = knn_predict(bank, y, queries, 5, k).argmax(dim=1)
        assert r0["acc"][k] == r1["acc"][k] == 100.0 * (single == yq).sum().item() / 23
    assert r0["self"] == r1["self"] == 100.0
    assert 40 < r0["acc"][5] < 100                          # neither perfect nor chance (20 %)
    full = knn_predict(bank, y, queries, 5, 100)            # a padded bank item would vote twice
    for r in (r0, r1):
        assert torch.allclose(r["scores"], full[r["test_index"]], rtol=1e-5)
    assert r0["stopped"] is None and r1["stopped"] is None and r0["calls"] == r1["calls"] == 0
    assert r0["stopped_late"] is None and r1["stopped_late"] is None
    assert r0["calls_late"] == r1["calls_late"] == 5


def test_knn_stop_returns_none_before_encoding_everything():
    import threading
    from knn import knn_accuracy
    train_set, test_set = _knn_sets()
    stop, net = threading.Event(), _CountingFlatten()
    stop.set()                                              # SIGTERM before the call
    assert knn_accuracy(net, train_set, test_set, 5, 4, 0, torch.device("cpu"), stop=stop) is None
    assert net.calls == 0
    stop.clear()
    net = _CountingFlatten(stop, set_at=3)                  # SIGTERM during the bank's 3rd batch
    assert knn_accuracy(net, train_set, test_set, 5, 4, 0, torch.device("cpu"), stop=stop) is None
    assert net.calls == 3                                   # one process checks every batch
    net = _CountingFlatten()
    stop.clear()
    assert 0 <= knn_accuracy(net, train_set, test_set, 5, 4, 0, torch.device("cpu"), stop=stop) <= 100
    assert net.calls == 10 + 6                              # 37 / 4 and 23 / 4 batches


# ---------------------------------------------------------------------- augment.py ---
AUG_TOL = 1e-4  # max abs difference on [0, 1] images: well inside one uint8 step (1/255); float32 rounding gives ~1e-6


def aug_images(*shape, seed=0):
    """Noise images in [0, 1] on the uint8 grid: every pixel differs, so a shifted or wrongly
    weighted sample shows up as a large difference."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).float() / 255


def tv_jitter(img, factors, order):
    """ColorJitter's forward with given parameters: the four functional ops in the given order."""
    import torchvision.transforms.v2.functional as TF
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        img = ops[op](img, float(factors[op]))
    return img


def test_augment_resized_crop_and_flip_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    from augment import resized_crop
    x = aug_images(6, 3, 40, 48)
    boxes = torch.tensor([[0, 0, 40, 48],    # the whole image: downscale on both axes
                          [0, 0, 20, 30],    # top-left border
                          [25, 30, 15, 18],  # bottom-right border
                          [5, 7, 3, 4],      # tiny: upscale on both axes
                          [3, 0, 37, 9],     # left border: rows down, columns up
                          [0, 47, 40, 1]])   # the last column alone
    flip = torch.tensor([False, True, False, True, True, False])
    for size in (24, 64):
        out = resized_crop(x, boxes, flip, size)
        assert out.shape == (6, 3, size, size)
        for b in range(6):
            ref = TF.resized_crop(x[b], *boxes[b].tolist(), [size, size], antialias=True)
            ref = TF.horizontal_flip(ref) if flip[b] else ref
            assert (out[b] - ref).abs().max() < AUG_TOL, (size, b)
    # rows of weights normalised to 1 may sum to 1 + 1e-7: a white image must still stay in [0, 1]
    assert resized_crop(torch.ones_like(x), boxes, flip, 24).max() <= 1


def test_augment_jitter_ops_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    import augment
    x = aug_images(5, 3, 12, 10)
    x[0] = 0.0                                     # black: hue and saturation divide by max
    x[1, :, :4] = x[1, :1, :4]                     # grey pixels (max = min)
    x[2, 1] = x[2, 0]                              # ties R = G: the sector rule decides
    x[3, 2] = x[3, 1]                              # ties G = B
    factors = torch.tensor([[0.6, 0.6, 0.8, -0.1], [1.4, 1.4, 1.2, 0.1], [0.9, 1.3, 0.85, 0.05],
                            [1.2, 0.7, 1.1, -0.07], [1.0, 1.0, 1.0, 0.5]])
    cases = [(augment.adjust_brightness, TF.adjust_brightness), (augment.adjust_contrast, TF.adjust_contrast),
             (augment.adjust_saturation, TF.adjust_saturation), (augment.adjust_hue, TF.adjust_hue)]
    for i, (ours, theirs) in enumerate(cases):
        out = ours(x, factors[:, i])
        for b in range(5):
            assert (out[b] - theirs(x[b], float(factors[b, i]))).abs().max() < AUG_TOL, (theirs.__name__, b)


def test_augment_color_jitter_follows_each_images_order():
    from augment import color_jitter
    x = aug_images(6, 3, 10, 9, seed=1)
    factors = torch.tensor([[0.7, 1.3, 0.8, 0.08]] * 3 + [[1.35, 0.65, 1.2, -0.09]] * 3)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2], [1, 2, 0, 3]])
    apply = torch.tensor([True, True, True, True, True, False])
    out = color_jitter(x, factors, order, apply)
    for b in range(6):
        ref = tv_jitter(x[b], factors[b], order[b].tolist()) if apply[b] else x[b]
        assert (out[b] - ref).abs().max() < AUG_TOL, b
    assert torch.equal(out[5], x[5])  # not applied: untouched, bit for bit


def test_augment_grayscale_solarize_normalize_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    from augment import normalize, random_grayscale, solarize
    x = aug_images(4, 3, 8, 9, seed=2)
    apply = torch.tensor([True, False, True, False])
    gray, sol = random_grayscale(x, apply), solarize(x, apply)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = normalize(x, mean, std)
    for b in range(4):
        ref = TF.rgb_to_grayscale(x[b], num_output_channels=3) if apply[b] else x[b]
        assert (gray[b] - ref).abs().max() < AUG_TOL
        ref = TF.solarize(x[b], 128 / 255) if apply[b] else x[b]
        assert (sol[b] - ref).abs().max() < AUG_TOL
        assert (norm[b] - TF.normalize(x[b], mean, std)).abs().max() < AUG_TOL
    assert (sol[0] != x[0]).any() and (sol[0] == x[0]).any()  # both sides of the threshold


def test_augment_blur_matches_torchvision_with_a_sigma_per_image():
    import torchvision.transforms.v2.functional as TF
    from augment import blur_kernel_size, gaussian_blur
    assert [blur_kernel_size(s) for s in (28, 32, 64, 65, 96, 224)] == [0, 0, 0, 7, 9, 23]
    x = aug_images(3, 3, 20, 17, seed=3)
    sigma = torch.tensor([0.4, 1.8, 0.1])
    out = gaussian_blur(x, 9, sigma)
    for b in range(3):
        ref = TF.gaussian_blur(x[b], [9, 9], [float(sigma[b])] * 2)
        assert (out[b] - ref).abs().max() < AUG_TOL, b
    assert (out[0] - out[1]).abs().max() > 0.05  # the two sigmas really differ


def tv_pipeline(img, p, b, size, mean, std, crop):
    """One image through the torchvision functional ops with the parameters of image b; also
    returns the image before solarize, whose threshold makes a 1e-7 difference a jump."""
    import torchvision.transforms.v2.functional as TF
    x = TF.to_dtype(img, torch.float32, scale=True)
    if crop:
        x = TF.resized_crop(x, *p.box[b].tolist(), [size, size], antialias=True)
        x = TF.horizontal_flip(x) if p.flip[b] else x
    x = x.expand(3, -1, -1)  # Grayscale(3) of a one-channel image
    x = tv_jitter(x, p.factors[b], p.order[b].tolist()) if p.jitter[b] else x
    x = TF.rgb_to_grayscale(x, num_output_channels=3) if p.gray[b] else x
    k = 2 * (size // 20) + 1
    x = TF.gaussian_blur(x, [k, k], [float(p.sigma[b])] * 2) if p.blur[b] and size > 64 else x
    before = x
    x = TF.solarize(x, 128 / 255) if p.solarize[b] else x
    return TF.normalize(x, mean, std), before


@pytest.mark.parametrize("channels, crop", [(3, True), (1, False)])
def test_augment_pipeline_matches_torchvision_per_image(channels, crop):
    import dataclasses
    from augment import apply_params, sample_params
    B, size, mean, std = 8, 80, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    H, W = (96, 88) if crop else (size, size)
    images = torch.randint(0, 256, (B, channels, H, W), generator=torch.Generator().manual_seed(4),
                           dtype=torch.uint8)
    p = sample_params(B, H, W, 0.08, 0.5, 0.5, torch.Generator().manual_seed(5))
    i = torch.arange(B)  # sampled boxes, factors, orders and sigmas; coins set to mix every case
    p = dataclasses.replace(p, flip=i % 2 == 0, jitter=i % 4 != 3, gray=i % 3 == 1, blur=i % 4 < 2,
                            solarize=i % 3 != 2)
    out = apply_params(images, p, size, mean, std, crop=crop)
    assert out.shape == (B, 3, size, size) and out.dtype == torch.float32
    std_t = torch.tensor(std)[:, None, None]
    for b in range(B):
        ref, before = tv_pipeline(images[b], p, b, size, mean, std, crop)
        # a rounding difference may cross the threshold; ~1/256 of the pixels lie right on it
        # where no op moved them (uint8 128)
        near = (before - 128 / 255).abs() < 1e-5
        assert near.float().mean() < 0.01
        assert (((out[b] - ref) * std_t).abs() * ~near).max() < AUG_TOL, b


def test_augment_random_choice_frequencies():
    from augment import VIEW1, VIEW2, sample_params
    n, g = 4000, torch.Generator().manual_seed(6)
    assert VIEW1 == dict(blur_p=1.0, solarize_p=0.0) and VIEW2 == dict(blur_p=0.1, solarize_p=0.2)
    p1 = sample_params(n, 224, 224, 0.08, generator=g, **VIEW1)
    p2 = sample_params(n, 224, 224, 0.08, generator=g, **VIEW2)
    for p in (p1, p2):
        for flag, freq in ((p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2)):
            assert abs(flag.float().mean() - freq) < 0.03
        for op in range(4):  # every op equally often at every position
            assert ((p.order == op).float().mean(dim=0) - 0.25).abs().max() < 0.03
        assert (p.order.sort(dim=1).values == torch.arange(4)).all()  # permutations
        for i, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            f = p.factors[:, i]
            assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
        assert 0.1 <= p.sigma.min() < 0.11 and 1.99 < p.sigma.max() <= 2.0
    assert p1.blur.all() and not p1.solarize.any()              # view 1: blur p 1, solarize p 0
    assert abs(p2.blur.float().mean() - 0.1) < 0.03 and abs(p2.solarize.float().mean() - 0.2) < 0.03


def test_augment_crop_boxes_follow_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop
    from augment import sample_crop
    n, g = 4000, torch.Generator().manual_seed(7)
    top, left, h, w = sample_crop(n, 224, 160, 0.08, g).T.double()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 160).all()
    # the rounding of h and w to pixels moves area and ratio a little past the sampled ranges
    area, ratio = h * w / (224 * 160), w / h
    assert area.min() > 0.08 * 0.97 and area.max() <= 1 and area.min() < 0.09
    assert ratio.min() > 0.75 * 0.97 and ratio.max() < 4 / 3 / 0.97
    # the corner is uniform over all the places the box fits, both ends included
    assert (top == 0).any() and (left == 0).any() and (top == 224 - h).any() and (left == 160 - w).any()
    # the same distribution as torchvision's sampler (the first fitting attempt favours small boxes)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        img = torch.zeros(1, 224, 160)
        tv = torch.tensor([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)])
    tv_area, tv_ratio = tv[:, 2] * tv[:, 3] / (224 * 160), tv[:, 3] / tv[:, 2]
    assert abs(area.mean() - tv_area.double().mean()) < 0.03 and abs(ratio.mean() - tv_ratio.double().mean()) < 0.03
    # no attempt fits a 4 px band: RandomResizedCrop's fallback, the central crop of ratio 3/4 or 4/3
    assert (sample_crop(50, 4, 200, 0.9, g) == torch.tensor([0, 97, 4, 5])).all()
    assert (sample_crop(50, 200, 4, 0.9, g) == torch.tensor([97, 0, 5, 4])).all()


def test_augment_two_views_are_the_asymmetric_pair_and_seeded():
    from augment import VIEW1, VIEW2, apply_params, augment, sample_params, two_views
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    a = torch.randint(0, 256, (4, 3, 80, 80), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    v1, v2 = two_views(a, 72, 0.2, mean, std, gen(0))
    g = gen(0)  # the same draws: view 1 with VIEW1's probabilities, then view 2 with VIEW2's
    p1 = sample_params(4, 80, 80, 0.2, generator=g, **VIEW1)
    p2 = sample_params(4, 80, 80, 0.2, generator=g, **VIEW2)
    assert torch.equal(v1, apply_params(a, p1, 72, mean, std)) and torch.equal(v2, apply_params(a, p2, 72, mean, std))
    w1, w2 = two_views(a, 72, 0.2, mean, std, gen(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)                      # same seed: same bits
    u1, u2 = two_views(a, 72, 0.2, mean, std, gen(1))
    assert not torch.equal(v1, u1) and not torch.equal(v2, u2)              # another seed: other views
    # crop=False: a pair of batches, one per view (the workers' two crops)
    b = a.flip(0)
    v1, v2 = two_views((a, b), 80, 0.2, mean, std, gen(2), crop=False)
    g = gen(2)
    assert torch.equal(v1, augment(a, 80, 0.2, mean=mean, std=std, generator=g, crop=False, **VIEW1))
    assert torch.equal(v2, augment(b, 80, 0.2, mean=mean, std=std, generator=g, crop=False, **VIEW2))


def test_augment_output_shape_grey_level_and_bad_input():
    import dataclasses
    from augment import apply_params, augment, sample_params, two_views
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    rgb = torch.randint(0, 256, (4, 3, 28, 28), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    views = two_views(rgb, 32, 0.08, mean, std, torch.Generator().manual_seed(0))
    assert all(v.shape == (4, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    # one channel (Fashion-MNIST) = the same image in all three channels
    one = augment(rgb[:, :1], 32, 0.08, 1.0, 0.2, mean, std, torch.Generator().manual_seed(1))
    three = augment(rgb[:, :1].expand(-1, 3, -1, -1), 32, 0.08, 1.0, 0.2, mean, std,
                    torch.Generator().manual_seed(1))
    assert torch.equal(one, three)
    # constant grey: crop, flip, blur, solarize (100 < 128) and grayscale keep it; jitter is off
    grey = torch.full((6, 3, 90, 90), 100, dtype=torch.uint8)
    p = sample_params(6, 90, 90, 0.08, 1.0, 1.0, torch.Generator().manual_seed(2))
    out = apply_params(grey, dataclasses.replace(p, jitter=torch.zeros(6, dtype=torch.bool)), 80, mean, std)
    expected = (100 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert (out - expected[:, None, None]).abs().max() < 1e-3
    with pytest.raises(ValueError, match="uint8"):
        augment(rgb.float(), 32, 0.08, 1.0, 0.0, mean, std, torch.Generator())
    with pytest.raises(ValueError, match="final size 32x32"):
        augment(rgb, 32, 0.08, 1.0, 0.0, mean, std, torch.Generator(), crop=False)


# ------------------------------------------------------------------------ bench.py ---
BENCH_TINY = ["--device", "cpu", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--queue-size", "32",
              "-K", "2", "--dim", "16", "--mlp-dim", "32", "--repeats", "1"]


def test_bench_data_tiny_prints_json_last(tmp_path):
    res = run_cli("bench.py", "--data", *BENCH_TINY, "--data-images", "4", "--data-steps", "2", "--data-workers", "0",
                  "--loader-images", "4", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("loader_pairs_per_s_per_worker", "loader_pairs_per_s_per_worker_pil", "augment_ms_per_batch_224",
                "augment_ms_per_batch_32", "end_to_end_images_per_s", "step_only_images_per_s"):
        assert math.isfinite(last[key]) and last[key] > 0, key
    assert last["device"].startswith("cpu") and last["torch"] == torch.__version__
    assert json.loads((tmp_path / "bench_data_cpu.json").read_text())["end_to_end_images_per_s"] == \
        last["end_to_end_images_per_s"]


def test_bench_step_channels_last_writes_its_own_file(tmp_path):
    res = run_cli("bench.py", *BENCH_TINY, "--scaling-queues", "32", "--scaling-k", "2", "--channels-last",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bench_cpu_resnet18_channels_last.json").read_text())
    assert result["images_per_s"]["snclr"] > 0 and result["args"]["channels_last"]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "argument --batch-size: must be a finite number > 0, got 0"),
    (["--repeats", "0"], "argument --repeats: must be a finite number > 0, got 0"),
    (["--data", "--data-steps", "0"], "argument --data-steps: must be a finite number > 0, got 0"),
    (["--arch", "vit_tiny", "--channels-last"], "--channels-last applies to ResNets"),
])
def test_bench_bad_input_fails_with_one_line(tmp_path, capsys, extra, message):
    import bench
    with pytest.raises(SystemExit) as exit_:
        bench.main([*extra, "--out", str(tmp_path / "out")])
    assert exit_.value.code != 0
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.strip().count("\n") == 0, err
    assert out == "" and not (tmp_path / "out").exists()


def test_bench_default_out_is_not_the_committed_results():
    import bench
    parser = bench.get_args_parser()
    out = pathlib.Path(parser.parse_args([]).out)
    assert out.parts[0] == "runs" and "results" not in out.parts   # runs/ is in .gitignore
    assert "--out results" in " ".join(parser.format_help().split())


# ---------------------------------------------------------------------- ablations.py ---
def test_ablation_results_of_other_settings_are_refused_not_reused(tmp_path):
    import ablations
    args = ablations.get_args_parser().parse_args(["--results", str(tmp_path), "--runs", str(tmp_path / "runs")])
    row = {"variant": "cosine", "seed": 0, "command": shlex.join(ablations.train_command("cosine", 0, args))}
    (tmp_path / "ablation_cosine_s0.json").write_text(json.dumps(row))
    assert ablations.result("cosine", 0, args) == row                      # the same settings: reused
    gpu = ablations.get_args_parser().parse_args(["--results", str(tmp_path), "--epochs", "100", "--device", "cuda"])
    with pytest.raises(SystemExit, match="holds a run of other settings"):
        ablations.result("cosine", 0, gpu)


# --------------------------------------------------------------------------- project ---
def test_no_top_level_module_shadows_the_standard_library():
    names = {p.stem for p in HERE.glob("*.py")}
    assert names and not names & set(sys.stdlib_module_names)
