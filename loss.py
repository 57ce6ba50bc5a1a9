"""The contrastive losses: InfoNCE (Eq. 1) and the SNCLR soft-neighbor loss (Eq. 2).

Notation (README.md), shared by both:
  z          (B, D)     this rank's online predictor outputs z = h(g(f(x))), the queries
  keys       (N, D)     the momentum keys k_j gathered over the R ranks in rank order, N = B R
  neighbors  (N, K, D)  n_ji = NN(k_j)_i, the K nearest queue entries of each key (Eq. 3)
  w          (B, K)     w_bi, the positiveness of row b's own neighbors (Eq. 4)
  b*         rank B + b, the row of b's own key among the N
The candidates are c_(j,0) = k_j and c_(j,i) = n_ji, N (K + 1) vectors, and

  p_b(j, i) = exp(z_b . c_(j,i) / tau) / sum_(j', i') exp(z_b . c_(j',i') / tau).

Every dot product is a cosine: the inputs are L2-normalised here. The losses are means over the
local batch without MoCo v3's factor 2 tau (SNCLR.forward applies it to the symmetric sum).
They compute in the dtype they are given: SNCLR.forward gives them at least float32, checks
the shapes where they enter, and its constructor checks tau and the form.
"""
import torch
import torch.nn.functional as F

FORMS = ("code", "paper")


def info_nce(z: torch.Tensor, keys: torch.Tensor, tau: float, rank: int = 0) -> torch.Tensor:
    """Eq. 1: L1(b) = -log( exp(z_b . k_b* / tau) / sum_j exp(z_b . k_j / tau) ), mean over b.

    z (B, D), keys (N, D) -> scalar. It is Eq. 2 with K = 0.
    """
    z, keys = F.normalize(z, dim=1), F.normalize(keys, dim=1)
    # b* = rank B + b: the row's own key among the N
    own = rank * z.shape[0] + torch.arange(z.shape[0], device=z.device)
    # L1(b) = -log softmax_j( z_b . k_j / tau )[b*]
    return F.cross_entropy(z @ keys.T / tau, own)


def candidate_log_probs(z: torch.Tensor, keys: torch.Tensor, neighbors: torch.Tensor,
                        tau: float, rank: int = 0) -> torch.Tensor:
    """log p_b(b*, i) for i = 0..K: row b's own key (i = 0) and its own K neighbors.

    z (B, D), keys (N, D), neighbors (N, K, D) -> (B, K + 1).
    """
    (B, D), (N, K) = z.shape, neighbors.shape[:2]
    # c_(j,0) = k_j, c_(j,i) = n_ji: N (K + 1) unit vectors
    candidates = F.normalize(torch.cat([keys[:, None], neighbors], dim=1), dim=2).reshape(-1, D)
    # log p_b(j, i) = log softmax over all (j, i) of z_b . c_(j,i) / tau       (B, N, K + 1)
    log_p = (F.normalize(z, dim=1) @ candidates.T / tau).log_softmax(dim=1).view(B, N, K + 1)
    # keep j = b*: the row's own key and its own neighbors
    rows = torch.arange(B, device=z.device)
    return log_p[rows, rank * B + rows]


def snclr_loss(z: torch.Tensor, keys: torch.Tensor, neighbors: torch.Tensor, w: torch.Tensor,
               tau: float, rank: int = 0, form: str = "code") -> torch.Tensor:
    """Eq. 2, the SNCLR loss over the N (K + 1) candidates, mean over the local batch:

      form="code"  (as released): L(b) = -( log p_b(b*, 0) + sum_i w_bi log p_b(b*, i) )
      form="paper" (as printed):  L(b) = -log( p_b(b*, 0) + sum_i w_bi p_b(b*, i) )

    The code form is a cross-entropy against a soft target (1 on the own key, w_bi on its own
    neighbors); with all w = 0 (or K = 0) both are Eq. 1 over the candidates.
    z (B, D), keys (N, D), neighbors (N, K, D), w (B, K) -> scalar."""
    log_p = candidate_log_probs(z, keys, neighbors, tau, rank)              # (B, K + 1)
    if form == "code":
        # L(b) = -( log p_b(b*, 0) + sum_i w_bi log p_b(b*, i) )
        return -(log_p[:, 0] + (w * log_p[:, 1:]).sum(dim=1)).mean()
    # L(b) = -log( p_b(b*, 0) + sum_i w_bi p_b(b*, i) ), as a logsumexp of logs: stable for small
    # p. log w = -inf drops a zero weight exactly; the inner where keeps its gradient finite
    # (d log w / dw at w = 0 would be inf * 0 = nan).
    log_w = torch.where(w > 0, torch.where(w > 0, w, 1.0).log(), float("-inf"))
    return -torch.cat([log_p[:, :1], log_p[:, 1:] + log_w], dim=1).logsumexp(dim=1).mean()
