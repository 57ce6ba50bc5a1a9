"""The monitors: the neighbor quality of the soft neighbors and the kNN vote, each against a loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import SNCLR
from monitors.neighbor_quality import NeighborQuality
from conftest import TINY, unit


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def loop_auroc(scores, positive):
    """P(a positive outscores a negative), ties one half: every (positive, negative) pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_loop_and_analytic_cases():
    from monitors.neighbor_quality import auroc
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(60, generator=g) * 5).round() / 5        # many ties
    positive = torch.rand(60, generator=g) < 0.4
    assert auroc(scores, positive) == pytest.approx(loop_auroc(scores.tolist(), positive.tolist()), abs=1e-12)
    ordered = torch.arange(10.0)
    assert auroc(ordered, ordered >= 5) == 1.0 and auroc(ordered, ordered < 5) == 0.0
    assert auroc(torch.full((10,), 0.2), ordered >= 5) == 0.5     # uniform w (hard, none): chance
    assert math.isnan(auroc(ordered, torch.ones(10, dtype=torch.bool)))


def test_neighbor_quality_matches_loop():
    from monitors.neighbor_quality import NeighborQuality
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
    from monitors.knn import knn_predict
    bank, queries = unit(30, 8, seed=1), unit(9, 8, seed=2)
    labels = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(3))
    got = knn_predict(bank, labels, queries, 4, k, 0.07, chunk=4)  # chunk < n_test: 3 chunks
    assert torch.allclose(got, loop_knn_scores(bank, labels, queries, 4, k, 0.07).float(), rtol=1e-5)


def test_knn_k1_votes_for_the_nearest_item_only():
    from monitors.knn import knn_predict
    bank = torch.eye(6)                                     # orthonormal: cos(e_i, e_j) = [i = j]
    labels = torch.tensor([3, 0, 2, 1, 3, 2])
    queries = F.normalize(torch.eye(6) + 0.1 * torch.ones(6, 6), dim=1)   # nearest item: its own
    scores = knn_predict(bank, labels, queries, 4, k=1, t=0.07)
    assert torch.equal(scores.argmax(dim=1), labels)
    assert torch.equal(scores > 0, F.one_hot(labels, 4).bool())          # one vote, one class
    assert torch.allclose(scores.max(dim=1).values, (queries.diagonal() / 0.07).exp())

