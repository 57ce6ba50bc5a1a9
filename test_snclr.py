"""The equations, each against a naive loop or an analytic case: Eq. 1-4, the queue C, the model
(keys, EMA, schedules, pairing) and one training step recomputed by hand. Fast, in one process,
no data: `pytest test_snclr.py`. Everything else (runs, data, monitors, faults) is in tests/."""
import math
import types

import pytest
import torch
import torch.nn.functional as F

import train
from loss import info_nce, snclr_loss
from memory_queue import MemoryQueue
from model import SNCLR, build_backbone, momentum_schedule
from positiveness import Positiveness

TINY = dict(image_size=16, dim=16, mlp_dim=32)  # a model small enough for a 2-core CPU


def unit(*shape, seed=0):
    """Random unit vectors along the last dimension (queue entries are unit vectors)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---------------------------------------------------- naive loop references ---
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
        p = [e / denom for e in expo[rank * B + b]]            # own key, then own neighbors
        if form == "paper":
            total += -math.log(p[0] + sum(float(w[b, i]) * p[i + 1] for i in range(K)))
        else:
            total += -(math.log(p[0]) + sum(float(w[b, i]) * math.log(p[i + 1]) for i in range(K)))
    return total / B


# ------------------------------------------------------------- Eq. 1, Eq. 2 ---
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_eq1_info_nce_matches_loop(rank):
    z, keys = torch.randn(4, 8), torch.randn(12, 8)
    assert info_nce(z, keys, 0.3, rank).item() == pytest.approx(loop_info_nce(z, keys, 0.3, rank), rel=1e-5)


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("rank", [0, 1])
def test_eq2_snclr_loss_matches_loop(form, rank):
    g = torch.Generator().manual_seed(1)
    z, keys, nb = torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    w = torch.rand(3, 4, generator=g)
    w[0, 1] = 0.0  # a zero weight must be handled exactly by both forms
    got = snclr_loss(z, keys, nb, w, 0.2, rank, form).item()
    assert got == pytest.approx(loop_snclr(z, keys, nb, w, 0.2, rank, form), rel=1e-5)


def test_eq2_paper_form_gradient_is_finite_where_a_weight_is_zero():
    """d L / d w_i = -p_i / (p_0 + sum_j w_j p_j) (Eq. 2, paper form), checked on the nonzero
    weights against the loop's probabilities; where w_i = 0 the gradient stays finite (a plain
    log w would give inf * 0 = nan there)."""
    g = torch.Generator().manual_seed(2)
    z, keys, nb = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    z, keys, nb = z.double(), keys.double(), nb.double()
    w = torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.0, 0.7]], dtype=torch.float64, requires_grad=True)
    snclr_loss(z, keys, nb, w, 0.2, 0, "paper").backward()
    assert torch.isfinite(w.grad).all()
    for b in range(2):
        cands = [c for j in range(2) for c in [keys[j]] + list(nb[j])]
        expo = [math.exp(cos(z[b], c) / 0.2) for c in cands]
        p = [e / sum(expo) for e in expo[4 * b: 4 * b + 4]]               # own key and own neighbors
        total = p[0] + sum(float(w.detach()[b, i]) * p[i + 1] for i in range(3))
        for i in range(3):
            if w.detach()[b, i] > 0:                                                # mean over B = 2 rows
                assert w.grad[b, i].item() == pytest.approx(-p[i + 1] / total / 2, rel=1e-9)


def test_eq2_zero_weights_make_both_forms_eq1_over_the_candidates():
    z, keys, nb = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 3, 6)
    w = torch.zeros(4, 3)
    code, paper = snclr_loss(z, keys, nb, w, 0.5, form="code"), snclr_loss(z, keys, nb, w, 0.5, form="paper")
    # InfoNCE over the enlarged set: place all neighbors after the keys; positives stay rows 0..B-1
    enlarged = torch.cat([keys, nb.reshape(-1, 6)])
    assert code.item() == pytest.approx(info_nce(z, enlarged, 0.5).item(), rel=1e-5)
    assert paper.item() == pytest.approx(code.item(), rel=1e-5)


def test_eq2_with_k0_equals_eq1():
    z, keys = torch.randn(4, 6), torch.randn(8, 6)
    for form in ("code", "paper"):
        got = snclr_loss(z, keys, torch.empty(8, 0, 6), torch.empty(4, 0), 0.2, rank=1, form=form)
        assert got.item() == pytest.approx(info_nce(z, keys, 0.2, rank=1).item(), rel=1e-6)


def test_eq2_identical_candidates_give_log_of_the_candidate_count():
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


def test_eq1_eq2_rank_offset_is_the_full_batch_split():
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


def test_eq1_eq2_inputs_are_normalised():
    z, keys, nb, w = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    a = snclr_loss(z, keys, nb, w, 0.2)
    b = snclr_loss(3 * z, 0.5 * keys, 7 * nb, w, 0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_eq1_eq2_keep_float64_to_1e12(form):
    """Given float64 the equations compute in float64: equal to the loop (Python floats) to 1e-12."""
    g = torch.Generator().manual_seed(2)
    z, keys = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    nb, w = torch.randn(6, 4, 5, generator=g, dtype=torch.float64), torch.rand(3, 4, generator=g, dtype=torch.float64)
    got = snclr_loss(z, keys, nb, w, 0.2, 1, form)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(loop_snclr(z, keys, nb, w, 0.2, 1, form), rel=1e-12)
    assert info_nce(z, keys, 0.3, 1).item() == pytest.approx(loop_info_nce(z, keys, 0.3, 1), rel=1e-12)


# -------------------------------------------------------------------- Eq. 4 ---
def test_eq4_cosine_positiveness_matches_loop():
    y, nb = torch.randn(3, 6), torch.randn(3, 4, 6)
    w = Positiveness(6, "cosine")(y, nb)
    for b in range(3):
        e = [math.exp(cos(y[b], nb[b, i])) for i in range(4)]
        for i in range(4):
            assert w[b, i].item() == pytest.approx(e[i] / sum(e), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 0.1])
def test_eq4_cosine_temperature_matches_loop_in_float64(t):
    y, nb = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    w = Positiveness(6, "cosine", positiveness_t=t)(y, nb)
    assert w.dtype == torch.float64
    for b in range(3):
        e = [math.exp(cos(y[b], nb[b, i]) / t) for i in range(4)]
        for i in range(4):
            assert w[b, i].item() == pytest.approx(e[i] / sum(e), rel=1e-12)


def test_eq4_smaller_temperature_sharpens_and_t1_is_the_released_rule():
    y, nb = torch.randn(8, 6), torch.randn(8, 5, 6)
    released = Positiveness(6, "cosine")(y, nb)
    assert torch.equal(Positiveness(6, "cosine", positiveness_t=1.0)(y, nb), released)
    sharp = Positiveness(6, "cosine", positiveness_t=0.1)(y, nb)
    assert (sharp.max(dim=1).values > released.max(dim=1).values).all()
    assert torch.equal(sharp.argmax(dim=1), released.argmax(dim=1))   # same order, larger spread


def test_eq4_learned_gamma_starts_at_one_scales_the_logits_and_learns():
    y, nb = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    att = Positiveness(6, "attention", learn_gamma=True).double()
    assert att.figures() == {"gamma": 1.0} and torch.allclose(att(y, nb), Positiveness(6, "cosine")(y, nb), atol=1e-12)
    with torch.no_grad():
        att.log_gamma.fill_(math.log(3.0))   # gamma = 3: the loop reference with 3 * cos
    w = att(y, nb)
    e = [math.exp(3 * cos(y[1], nb[1, i])) for i in range(4)]
    assert w[1, 2].item() == pytest.approx(e[2] / sum(e), rel=1e-12)
    z, keys, neighbors = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), nb
    snclr_loss(z, keys, neighbors, att(y, nb), 0.2).backward()
    assert att.log_gamma.grad is not None and att.log_gamma.grad.abs().item() > 0
    assert "log_gamma" not in dict(Positiveness(6, "attention").named_parameters())  # fixed gamma = 1
    assert Positiveness(6, "attention").figures() == {}
    with pytest.raises(ValueError, match="--positiveness-t applies to --positiveness cosine, not attention"):
        Positiveness(6, "attention", positiveness_t=0.5)
    with pytest.raises(ValueError, match="--learn-gamma applies to --positiveness attention, not cosine"):
        Positiveness(6, "cosine", learn_gamma=True)
    with pytest.raises(ValueError, match="--positiveness-t must be a finite number > 0, got 0.0"):
        Positiveness(6, "cosine", positiveness_t=0.0)


def test_eq4_attention_starts_as_cosine_and_is_learnable():
    y, nb = torch.randn(3, 6), torch.randn(3, 4, 6)
    att = Positiveness(6, "attention")
    assert torch.allclose(att(y, nb), Positiveness(6, "cosine")(y, nb), atol=1e-6)
    with torch.no_grad():
        att.f1.weight.mul_(5.0)  # a larger scale must sharpen w: loop reference with gamma * 5
    w = att(y, nb)
    e = [math.exp(5 * cos(y[0], nb[0, i])) for i in range(4)]
    assert w[0, 0].item() == pytest.approx(e[0] / sum(e), rel=1e-5)
    assert len(list(att.parameters())) == 2 and not list(Positiveness(6, "cosine").parameters())


@pytest.mark.parametrize("rule, flows", [("cosine", True), ("attention", True), ("hard", False), ("none", False)])
def test_eq4_gradient_reaches_y_only_through_learned_weights(rule, flows):
    y = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    keys, nb = torch.randn(4, 8), torch.randn(4, 3, 8)
    w = Positiveness(8, rule)(y, nb)
    snclr_loss(z, keys, nb, w, 0.2).backward()
    got = y.grad is not None and y.grad.abs().sum().item() > 0
    assert got == flows
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("K", [1, 4])
def test_eq4_threshold_keeps_a_weight_of_exactly_one_over_k(K):
    """The released threshold zeroes w < 1/K only: with K = 1 (w = 1) or tied neighbors
    (every w = 1/K) all weights stay, else SNCLR would silently become InfoNCE."""
    y = torch.randn(3, 4)
    tied = torch.randn(3, 1, 4).expand(3, K, 4)                  # K copies of one neighbor
    w = Positiveness(4, "cosine", threshold=True)(y, tied)
    assert torch.allclose(w, torch.full((3, K), 1.0 / K)) and (w > 0).all()


def test_eq4_hard_none_and_threshold():
    y, nb = torch.randn(2, 4), torch.randn(2, 5, 4)
    assert torch.equal(Positiveness(4, "hard")(y, nb), torch.ones(2, 5))
    assert torch.equal(Positiveness(4, "none")(y, nb), torch.zeros(2, 5))
    w = Positiveness(4, "cosine")(y, nb)
    wt = Positiveness(4, "cosine", threshold=True)(y, nb)
    assert torch.equal(wt, torch.where(w >= 0.2, w, 0.0)) and (wt == 0).any() and (wt > 0).any()
    with pytest.raises(ValueError, match="unknown positiveness rule 'soft'"):
        Positiveness(4, "soft")
    with pytest.raises(ValueError, match="unknown positiveness option 'temperature'"):
        Positiveness(4, "cosine", temperature=0.5)  # the old name of positiveness_t


# ------------------------------------------------------ memory queue, Eq. 3 ---
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


def test_eq3_queue_searches_filled_slots_only():
    q = MemoryQueue(10, 4)
    entries = unit(4, 4, seed=3)
    q.enqueue(entries)
    query = -entries.sum(0, keepdim=True)  # negative cosine with every filled entry: an empty
    idx = q.nearest_indices(query, 4)      # (zero) slot would score 0 and win if searched
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="K=5 neighbors but the queue holds 4"):
        q.nearest_indices(query, 5)
    assert q.nearest_indices(query, 0).shape == (1, 0)         # K = 0: nothing to search


def test_eq3_queue_topk_matches_brute_force():
    q = MemoryQueue(50, 6)
    q.enqueue(unit(37, 6, seed=4))
    query = torch.randn(5, 6)
    got = q.features[q.nearest_indices(query, 7)]
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
    with pytest.raises(ValueError, match=r"got keys \(2, 3\), labels \(3,\)"):
        q.enqueue(unit(2, 3, seed=4), torch.tensor([1, 2, 3]))


def test_queue_bad_input():
    q = MemoryQueue(4, 3)
    with pytest.raises(ValueError, match=r"n <= the queue size 4 .* got keys \(5, 3\)"):
        q.enqueue(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"keys \(n, 3\) .* got keys \(2, 4\)"):
        q.enqueue(torch.randn(2, 4))


# -------------------------------------------------------------------- model ---
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


def test_momentum_schedule_is_a_half_cosine():
    """m(t) = 1 - (1 - base) (cos(pi t / T) + 1) / 2: at 0, T/2 and T a linear ramp agrees, so the
    quarter points tell them apart (a linear ramp gives 0.9925 and 0.9975)."""
    assert momentum_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_schedule(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_schedule(100, 100, 0.99) == pytest.approx(1.0)
    for t in (25, 75):
        expected = 1 - 0.01 * (math.cos(math.pi * t / 100) + 1) / 2
        assert momentum_schedule(t, 100, 0.99) == pytest.approx(expected, abs=1e-12)
    assert momentum_schedule(25, 100, 0.99) == pytest.approx(0.99146446609, abs=1e-10)


def test_momentum_keys_are_g_prime_of_f_prime_without_the_predictor():
    """k = g'(f'(x)): the momentum encoder and projector only; neither the online branch nor
    the predictor h (BYOL's asymmetry: only the online branch predicts)."""
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, num_neighbors=0, queue_size=8).double().eval()
    with torch.no_grad():
        for p in m.online_parameters() + list(m.predictor.parameters()):  # online differs from momentum
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    expected = x
    for layer in [m.momentum_backbone, *m.momentum_projector]:            # f', then g' layer by layer
        expected = layer(expected)
    assert torch.allclose(m.momentum_keys(x), expected, atol=1e-12)
    assert not torch.allclose(m.momentum_keys(x), m.predictor(expected), atol=1e-3)


def test_eq1_model_with_k0_is_symmetric_infonce():
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, tau=0.2, num_neighbors=0, queue_size=8)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    k1, k2 = m.momentum_keys(x1), m.momentum_keys(x2)
    empty = torch.empty(4, 0, 16)
    loss, w = m(x1, x2, k1, k2, empty, empty)
    z1, z2 = m.predictor(m.projector(m.backbone(x1))), m.predictor(m.projector(m.backbone(x2)))
    expected = 2 * 0.2 * (info_nce(z1, k2, 0.2) + info_nce(z2, k1, 0.2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_eq2_eq4_model_pairs_each_view_with_the_other_views_neighbors():
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


def loop_nearest(query, entries, k):
    """Eq. 3 by sorting: the k rows of entries with the largest cosine to query."""
    return sorted(range(entries.shape[0]), key=lambda j: -cos(query, entries[j]))[:k]


def loop_cosine_w(y, neighbors, t=1.0):
    """Eq. 4 (released): w_i = exp(cos(y, n_i) / t) / sum_j exp(cos(y, n_j) / t)."""
    e = [math.exp(cos(y, n) / t) for n in neighbors]
    return [v / sum(e) for v in e]


def test_eq2_train_step_equals_a_plain_recomputation_of_one_step():
    """train_step against the step written out in one process, in float64: keys k = g'(f'(x)),
    Eq. 3 by sorting the queue, w by Eq. 4's loop, z1 paired with NN(k2) and z2 with NN(k1) (as
    released), Eq. 2's loop, then the EMA and the enqueue of k2."""
    import copy
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, tau=0.3, num_neighbors=3, queue_size=32).double()
    m.queue.enqueue(unit(10, 16, seed=4).double(), torch.arange(10))
    ref = copy.deepcopy(m)                                        # the same state, recomputed by hand
    x1, x2 = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    loss, w = train.train_step(m, m, x1, x2, opt, torch.amp.GradScaler("cpu", enabled=False), 0.9,
                         labels=torch.tensor([7, 8, 9, 7]))
    with torch.no_grad():
        k1 = ref.momentum_projector(ref.momentum_backbone(x1))                     # g'(f'(x1))
        k2 = ref.momentum_projector(ref.momentum_backbone(x2))
        queue = ref.queue.features[:10]
        nn1 = torch.stack([queue[loop_nearest(k, queue, 3)] for k in k1])          # NN(k1) (4, 3, 16)
        nn2 = torch.stack([queue[loop_nearest(k, queue, 3)] for k in k2])
        y1, y2 = ref.projector(ref.backbone(x1)), ref.projector(ref.backbone(x2))
        z1, z2 = ref.predictor(y1), ref.predictor(y2)
    w1 = torch.tensor([loop_cosine_w(y1[b], nn2[b]) for b in range(4)], dtype=torch.float64)  # y1 vs NN(k2)
    w2 = torch.tensor([loop_cosine_w(y2[b], nn1[b]) for b in range(4)], dtype=torch.float64)
    expected = 2 * 0.3 * (loop_snclr(z1, k2, nn2, w1, 0.3, 0, "code") + loop_snclr(z2, k1, nn1, w2, 0.3, 0, "code"))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(w, torch.cat([w1, w2]), atol=1e-12)
    for new, old, online in zip(m.momentum_parameters(), ref.momentum_parameters(), m.online_parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * online, atol=1e-12)          # EMA after the update
    assert len(m.queue) == 14 and m.queue.labels[10:14].tolist() == [7, 8, 9, 7]
    assert torch.allclose(m.queue.features[10:14], k2 / k2.norm(dim=1, keepdim=True), atol=1e-12)


def test_eq3_train_step_searches_before_it_enqueues_view2_keys():
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=64)
    m.queue.enqueue(unit(5, 16, seed=3))
    found = []
    search = m.queue.nearest_indices
    m.queue.nearest_indices = lambda q, k: found.append(search(q, k)) or found[-1]
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    k2 = m.momentum_keys(x2)  # train-mode BN: the same keys the step computes
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    train.train_step(m, m, x1, x2, opt, torch.amp.GradScaler("cpu", enabled=False), 0.99)
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
    with pytest.raises(ValueError, match="unknown positiveness rule 'soft'"):
        SNCLR("resnet18", **TINY, positiveness="soft")


@pytest.mark.parametrize("k, n, rank, what", [
    ((4, 16), (4, 3, 16), 2, "rank 2"),                       # rows [4, 6) outside N = 4
    ((4, 15), (4, 3, 16), 0, r"keys \(4, 15\)"),            # keys of another D
    ((4, 16), (3, 3, 16), 0, r"neighbors \(3, 3, 16\)"),    # neighbors of another N
    ((4, 16), (4, 3), 0, r"neighbors \(4, 3\)"),            # neighbors without D
])
def test_model_refuses_gathered_inputs_of_the_wrong_shape(k, n, rank, what):
    """SNCLR.forward is where keys and neighbors enter the equations: one line naming them."""
    m = SNCLR("resnet18", **TINY, num_neighbors=3, queue_size=8)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=f"expected keys \\(N, D=16\\) and neighbors .*{what}"):
        m(x, x, torch.randn(*k), torch.randn(4, 16), torch.randn(*n), torch.randn(4, 3, 16), rank)


def test_model_computes_the_equations_in_float32_under_bf16_autocast():
    """Encoders in bf16, Eq. 4 and Eq. 2 in float32: the loss equals the float32 recomputation
    from the same (bf16) y and z, and keys come out in float32 for the search (Eq. 3)."""
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, tau=0.2, num_neighbors=3, queue_size=8)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    k1, k2, n1, n2 = unit(4, 16, seed=1), unit(4, 16, seed=2), unit(4, 3, 16, seed=3), unit(4, 3, 16, seed=4)
    with torch.autocast("cpu", torch.bfloat16):
        loss, w = m(x1, x2, k1, k2, n1, n2)
        y1, y2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        assert y1.dtype == torch.bfloat16 and m.momentum_keys(x1).dtype == torch.float32
        z1, z2 = m.predictor(y1), m.predictor(y2)
    assert loss.dtype == torch.float32 and w.dtype == torch.float32
    y1, y2, z1, z2 = y1.float(), y2.float(), z1.float(), z2.float()
    w1, w2 = m.positiveness(y1, n2), m.positiveness(y2, n1)
    expected = 2 * 0.2 * (snclr_loss(z1, k2, n2, w1, 0.2) + snclr_loss(z2, k1, n1, w2, 0.2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(w, torch.cat([w1, w2]), atol=1e-6)



# ---------------------------------------------------------------- schedules ---
def test_learning_rate_schedule_at_hand_computed_points():
    args = types.SimpleNamespace(lr=0.4, batch_size=512, epochs=10, warmup_epochs=2)
    peak = 0.4 * 512 / 256                                              # 0.8: base lr x batch / 256
    steps = 5                                                           # per epoch
    assert train.learning_rate(0, steps, args) == 0.0
    assert train.learning_rate(5, steps, args) == pytest.approx(peak / 2)          # epoch 1 of 2 warm-up
    assert train.learning_rate(10, steps, args) == pytest.approx(peak)             # end of warm-up
    assert train.learning_rate(30, steps, args) == pytest.approx(peak / 2)         # cosine half way: 4 of 8
    assert train.learning_rate(20, steps, args) == pytest.approx(peak * (1 + math.cos(math.pi / 4)) / 2)
    assert train.learning_rate(50, steps, args) == pytest.approx(0.0, abs=1e-12)   # the end


def test_sincos_position_embedding_formula():
    from model import sincos_position_embedding
    pe = sincos_position_embedding(3, 8)                   # 3 x 3 patches, width 8: d = 2 frequencies
    assert pe.shape == (1, 10, 8) and torch.equal(pe[0, 0], torch.zeros(8))
    r, c = 1, 2                                            # token 1 + 3 r + c
    omega = [1.0, 1.0 / 10000 ** 0.5]
    expected = [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega] + \
        [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]
    assert pe[0, 1 + 3 * r + c].tolist() == pytest.approx(expected, abs=1e-6)

