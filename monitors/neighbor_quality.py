"""Neighbor quality: are SNCLR's candidate neighbors of the query's class, and does w know it?

SNCLR's claim (paper Sec. 3.2) is that the positiveness w tells true positives from false ones
among the K neighbors of Eq. 3. With class labels, used here for monitoring only and never by
the loss, each (query, neighbor) pair is "same class" or "other class", and one epoch gives:

  nn_agree       share of the K neighbors that share the query's class
  nn_top1_agree  the same for the nearest neighbor alone (what NNCLR pulls; solo-learn logs it)
  w_agree        sum of w over same-class neighbors / sum of w: the share of the positive
                 weight that lands on the right class (equals nn_agree when w is uniform)
  w_same, w_other  mean w of same-class and of other-class neighbors
  w_auroc        AUROC of w for telling same-class from other-class neighbors: the
                 probability that a random same-class pair has a larger w than a random
                 other-class pair (ties count one half); 0.5 = no better than chance

The sums are exact over every pair of the epoch; the AUROC uses a sample (the first rows of
each step's w, a random set of images since the loader shuffles) to bound memory at ImageNet
scale. Everything accumulates on the device and is read once, at the epoch's end.
"""
import torch

from runtime import distributed

# The sums kept on the device per epoch (see `NeighborQuality.update`); rows and pairs are
# counted on the host (their shapes are known there, and a host number copied to the GPU would
# make the host wait).
SUMS = ("same", "top1_same", "w_same", "w_other", "w")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney AUROC: P(s_pos > s_neg) + P(s_pos = s_neg) / 2, from average ranks.

    scores (n,) float, positive (n,) bool -> a float in [0, 1]; nan without both classes.
    U = (sum of the positives' ranks) - n_pos (n_pos + 1) / 2, AUROC = U / (n_pos n_neg),
    with tied scores all given the average of their ranks.
    """
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = scores.double().sort()
    _, group, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()                     # 1-based rank of each tie group's last item
    ranks = (last - (counts - 1) / 2.0)[group]           # (n,) average rank, in sorted order
    u = ranks[positive[order]].sum().item() - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


class NeighborQuality:
    """One epoch's label agreement of the neighbors and the calibration of w.

    update(w, same) after each step: w (n, K) positiveness, same (n, K) bool, True where the
    neighbor's queue label equals the query's label. summary() at the epoch's end sums over
    ranks (a collective: every rank calls it) and returns the figures of the module docstring.
    """

    def __init__(self, device: torch.device, sample_rows: int = 64):
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        self.rows = self.pairs = 0  # this rank's, counted on the host
        self.sample_rows = sample_rows
        self.samples = []  # (w, same) of the first sample_rows rows of each step

    @torch.no_grad()
    def observe(self, w: torch.Tensor, queue_labels: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor) -> None:
        """One training step: w (n, K), the queue's labels (size,), the rows idx (n, K) of each
        query's neighbors in the queue, labels (n / 2,) of the images (w's rows are view 1 then
        view 2 of the same images)."""
        self.update(w, queue_labels[idx] == labels.repeat(2)[:, None])  # (n, K) same class?

    @torch.no_grad()
    def update(self, w: torch.Tensor, same: torch.Tensor) -> None:
        if w.shape[1] == 0:  # K = 0 or the queue still too short: no neighbors this step
            return
        w, s = w.double(), same.double()                                    # (n, K)
        self.sums += torch.stack([s.sum(), s[:, 0].sum(), (w * s).sum(), (w * (1 - s)).sum(), w.sum()])
        self.rows, self.pairs = self.rows + w.shape[0], self.pairs + w.numel()
        self.samples.append((w[:self.sample_rows].float(), same[:self.sample_rows].clone()))  # not a view of all

    def summary(self) -> dict:
        """Figures over every rank's pairs (None where undefined); {} when no step had neighbors."""
        counts = torch.tensor([self.rows, self.pairs], dtype=torch.float64, device=self.sums.device)
        totals = distributed.all_reduce_sum(torch.cat([counts, self.sums])).tolist()
        sums = dict(zip(("rows", "pairs") + SUMS, totals))
        if sums["pairs"] == 0:
            return {}
        # every rank ran the same steps, so the samples have the same shape and can be gathered
        w = distributed.all_gather(torch.cat([x.flatten() for x, _ in self.samples]))        # (m,)
        same = distributed.all_gather(torch.cat([s.flatten() for _, s in self.samples]))     # (m,)
        ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731 (None: undefined, e.g. all w = 0)
        score = auroc(w, same)
        return {"nn_agree": sums["same"] / sums["pairs"], "nn_top1_agree": sums["top1_same"] / sums["rows"],
                "w_agree": ratio(sums["w_same"], sums["w"]), "w_same": ratio(sums["w_same"], sums["same"]),
                "w_other": ratio(sums["w_other"], sums["pairs"] - sums["same"]),
                "w_auroc": None if score != score else score}
