"""The equations and the components they run on, each against a naive loop or an analytic case:
Eq. 1-4, the queue, the model and one training step, momentum, LARS, the neighbor monitor,
the augmentation ops, kNN. Fast and in one process: `pytest test_snclr.py`."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import options

from lars import LARS
from loss import info_nce, snclr_loss
from memory_queue import MemoryQueue
from model import SNCLR, build_backbone, momentum_schedule
from neighbor_monitor import NeighborQuality
from positiveness import Positiveness
from conftest import HERE, TINY, unit, SMOKE


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
def test_eq1_eq2_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


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
    w = Positiveness(6, "cosine", temperature=t)(y, nb)
    assert w.dtype == torch.float64
    for b in range(3):
        e = [math.exp(cos(y[b], nb[b, i]) / t) for i in range(4)]
        for i in range(4):
            assert w[b, i].item() == pytest.approx(e[i] / sum(e), rel=1e-12)


def test_eq4_smaller_temperature_sharpens_and_t1_is_the_released_rule():
    y, nb = torch.randn(8, 6), torch.randn(8, 5, 6)
    released = Positiveness(6, "cosine")(y, nb)
    assert torch.equal(Positiveness(6, "cosine", temperature=1.0)(y, nb), released)
    sharp = Positiveness(6, "cosine", temperature=0.1)(y, nb)
    assert (sharp.max(dim=1).values > released.max(dim=1).values).all()
    assert torch.equal(sharp.argmax(dim=1), released.argmax(dim=1))   # same order, larger spread


def test_eq4_learned_gamma_starts_at_one_scales_the_logits_and_learns():
    y, nb = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    att = Positiveness(6, "attention", learn_gamma=True).double()
    assert att.gamma.item() == 1.0 and torch.allclose(att(y, nb), Positiveness(6, "cosine")(y, nb), atol=1e-12)
    with torch.no_grad():
        att.log_gamma.fill_(math.log(3.0))   # gamma = 3: the loop reference with 3 * cos
    w = att(y, nb)
    e = [math.exp(3 * cos(y[1], nb[1, i])) for i in range(4)]
    assert w[1, 2].item() == pytest.approx(e[2] / sum(e), rel=1e-12)
    z, keys, neighbors = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), nb
    snclr_loss(z, keys, neighbors, att(y, nb), 0.2).backward()
    assert att.log_gamma.grad is not None and att.log_gamma.grad.abs().item() > 0
    assert "log_gamma" not in dict(Positiveness(6, "attention").named_parameters())  # fixed gamma = 1
    with pytest.raises(ValueError, match="temperature applies to mode 'cosine' only"):
        Positiveness(6, "attention", temperature=0.5)
    with pytest.raises(ValueError, match="learn_gamma applies to mode 'attention' only"):
        Positiveness(6, "cosine", learn_gamma=True)


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


@pytest.mark.parametrize("mode, flows", [("cosine", True), ("attention", True), ("hard", False), ("none", False)])
def test_eq4_gradient_reaches_y_only_through_learned_weights(mode, flows):
    y = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    keys, nb = torch.randn(4, 8), torch.randn(4, 3, 8)
    w = Positiveness(8, mode)(y, nb)
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
    with pytest.raises(ValueError, match="mode 'soft'"):
        Positiveness(4, "soft")
    with pytest.raises(ValueError, match="neighbors"):
        Positiveness(4)(y, torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="dim = 6"):
        Positiveness(6)(y, nb)  # D = 4 features into a module built for 6


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
    with pytest.raises(ValueError, match="k=5 neighbors but the queue holds 4"):
        q.nearest_neighbors(query, 5)


def test_eq3_queue_topk_matches_brute_force():
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
    from train import train_step
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, tau=0.3, num_neighbors=3, queue_size=32).double()
    m.queue.enqueue(unit(10, 16, seed=4).double(), torch.arange(10))
    ref = copy.deepcopy(m)                                        # the same state, recomputed by hand
    x1, x2 = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    loss, w = train_step(m, m, x1, x2, opt, torch.amp.GradScaler("cpu", enabled=False), 0.9,
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


# ---------------------------------------------------------------- optimiser ---
def loop_lars(params, grads, velocity, lr, wd, mu, eta, adapt):
    """lars.py's docstring formula, one parameter at a time, in place on params / velocity."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        u = g + wd * p
        if adapt:
            p_norm, u_norm = p.norm(), u.norm()
            u = u * (eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
        velocity[i] = mu * velocity[i] + u
        params[i] = p - lr * velocity[i]


def test_foreach_lars_equals_the_per_parameter_formula_in_float64():
    """Four steps of LARS on two groups (decayed + adapted, and neither) against loop_lars, in
    float64 to 1e-12: with a zero parameter (ratio 1), a zero gradient and zero decay (ratio 1),
    a parameter without gradient (skipped: unchanged, no momentum state), lr and momentum
    changed between steps as train.py's schedule changes lr."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3), (5, 4), (6, 5), (7,), (5,), (2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        params[1].zero_()                                     # a zero weight: ||p|| = 0
    decayed, plain = params[:3] + [params[5]], params[3:5]
    opt = LARS([{"params": decayed, "weight_decay": 0.1, "lars_adapt": True},
                {"params": plain, "weight_decay": 0.0, "lars_adapt": False}], momentum=0.9, trust_coefficient=0.02)
    ref = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in params]
    for step in range(4):
        lr = 0.5 + 0.25 * step
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        grads[2] = torch.zeros_like(grads[2])                 # a zero gradient (and u = wd p != 0)
        grads[5] = None                                       # no gradient: skipped
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr, 0.9 - 0.1 * step
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        ids = {id(p): i for i, p in enumerate(params)}
        for group, (wd, adapt) in zip(opt.param_groups, ((0.1, True), (0.0, False))):
            idx = [ids[id(p)] for p in group["params"]]
            sub_p, sub_v = [ref[i] for i in idx], [velocity[i] for i in idx]
            loop_lars(sub_p, [grads[i] for i in idx], sub_v, lr, wd, 0.9 - 0.1 * step, 0.02, adapt)
            for j, i in enumerate(idx):
                ref[i], velocity[i] = sub_p[j], sub_v[j]
        for i, p in enumerate(params):
            assert torch.allclose(p.detach(), ref[i], rtol=0, atol=1e-12), (step, i)
    assert params[5] not in opt.state                         # never had a gradient: no buffer
    assert torch.equal(params[5].detach(), ref[5])


def test_foreach_lars_with_a_zero_update_keeps_the_parameter():
    """u = 0 (zero gradient, no decay, adapted): ratio 1, v = mu v, no NaN from 0 / 0."""
    p = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
    opt = LARS([{"params": [p], "weight_decay": 0.0, "lars_adapt": True}], lr=1.0, momentum=0.9)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, 2, dtype=torch.float64))


# ----------------------------------------------------- neighbor_monitor.py ---
def loop_auroc(scores, positive):
    """P(a positive outscores a negative), ties one half: every (positive, negative) pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_loop_and_analytic_cases():
    from neighbor_monitor import auroc
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(60, generator=g) * 5).round() / 5        # many ties
    positive = torch.rand(60, generator=g) < 0.4
    assert auroc(scores, positive) == pytest.approx(loop_auroc(scores.tolist(), positive.tolist()), abs=1e-12)
    ordered = torch.arange(10.0)
    assert auroc(ordered, ordered >= 5) == 1.0 and auroc(ordered, ordered < 5) == 0.0
    assert auroc(torch.full((10,), 0.2), ordered >= 5) == 0.5     # uniform w (hard, none): chance
    assert math.isnan(auroc(ordered, torch.ones(10, dtype=torch.bool)))


def test_neighbor_quality_matches_loop():
    from neighbor_monitor import NeighborQuality
    g = torch.Generator().manual_seed(1)
    steps = [(torch.rand(6, 3, generator=g).softmax(1), torch.rand(6, 3, generator=g) < 0.5) for _ in range(3)]
    quality = NeighborQuality(torch.device("cpu"), sample_rows=6)
    for w, same in steps:
        quality.update(w, same)
    quality.update(torch.empty(6, 0), torch.empty(6, 0, dtype=torch.bool))  # a step without neighbors
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
    assert NeighborQuality(torch.device("cpu")).summary() == {}


class _SeenByMonitor(NeighborQuality):
    """The monitor's input of the last step."""
    def update(self, w, same):
        self.w, self.same = w, same


def test_train_step_marks_same_class_neighbors_and_the_loss_ignores_labels():
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
        quality = _SeenByMonitor(torch.device("cpu"))
        loss, w = train_step(m, m, x1, x2, opt, torch.amp.GradScaler("cpu", enabled=False), 0.99,
                             labels=labels, quality=quality)
        same = quality.same
        idx1, idx2 = found                                    # view 1's w pairs with NN(k2), view 2's with NN(k1)
        expected = torch.cat([queue_labels[idx2], queue_labels[idx1]]) == labels.repeat(2)[:, None]
        assert torch.equal(same, expected) and w.shape == (8, 2)
        assert m.queue.labels[6:10].tolist() == labels.tolist()   # enqueued beside the view-2 keys
        results.append((loss.item(), [p.detach().clone() for p in m.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(params_a, params_b))


# ----------------------------------------------------------------- train.py ---
def test_learning_rate_schedule_at_hand_computed_points():
    import train
    args = options.parse_args((
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
    resnet = options.parse_args(["--arch", "resnet50"])
    vit = options.parse_args(["--arch", "vit_small"])
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


# ------------------------------------------------------------------- knn.py ---
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


# --------------------------------------------------------------- augment.py ---
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


# ------------------------------------------------------------------ project ---
def test_no_top_level_module_shadows_the_standard_library():
    names = {p.stem for p in HERE.glob("*.py")}
    assert names and not names & set(sys.stdlib_module_names)
