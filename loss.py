"""The contrastive losses: InfoNCE (Eq. 1) and the SNCLR soft-neighbor loss (Eq. 2).

Notation (README.md, "Notation"), shared by both functions:
  z        (B, D) this rank's online predictor outputs (queries), B = local batch
  keys     (N, D) momentum keys gathered over all R ranks in rank order, N = B * R
  rank     the positive key of local row b is keys[b*], b* = rank * B + b
Every dot product is a cosine: inputs are L2-normalised here, whatever the caller passed.
The losses are means over the local batch and do *not* include MoCo v3's 2 tau factor; the
model applies it to the symmetric sum (model.py, SNCLR.forward). They compute in at least
float32 and in float64 when given float64 (precision.py).
"""
import math

import torch
import torch.nn.functional as F

from precision import compute_dtype

FORMS = ("code", "paper")


def info_nce(z: torch.Tensor, keys: torch.Tensor, tau: float, rank: int = 0) -> torch.Tensor:
    """Eq. 1: L1(b) = -log( exp(z_b . k_b* / tau) / sum_j exp(z_b . k_j / tau) ), mean over b.

    z (B, D), keys (N, D), b* = rank * B + b  ->  scalar.
    """
    _check(z, keys, tau, rank)
    dtype = compute_dtype(z, keys)
    z, keys = F.normalize(z.to(dtype), dim=1), F.normalize(keys.to(dtype), dim=1)
    B = z.shape[0]
    # z_b . k_j / tau for every gathered key j
    logits = z @ keys.T / tau                                          # (B, N)
    # b* = rank * B + b: the row's own key among the N
    positives = rank * B + torch.arange(B, device=z.device)            # (B,)
    # L1(b) = -log softmax_j(z_b . k_j / tau)[b*]
    return F.cross_entropy(logits, positives)


def candidate_log_probs(z: torch.Tensor, keys: torch.Tensor, neighbors: torch.Tensor,
                        tau: float, rank: int = 0) -> torch.Tensor:
    """log p_b(b*, i) for i = 0..K: the own key (i = 0) and its K neighbors (i >= 1).

    The candidate set is every gathered key with its neighbors, c_(j,0) = k_j and
    c_(j,i) = NN(k_j)_i, N * (K + 1) vectors; p_b is the softmax of z_b . c / tau over all of
    them. z (B, D), keys (N, D), neighbors (N, K, D)  ->  (B, K + 1).
    """
    N, K1, D = keys.shape[0], neighbors.shape[1] + 1, keys.shape[1]
    dtype = compute_dtype(z, keys, neighbors)
    z = F.normalize(z.to(dtype), dim=1)                                                 # (B, D)
    # c_(j,0) = k_j, c_(j,i) = NN(k_j)_i
    candidates = torch.cat([keys.to(dtype)[:, None], neighbors.to(dtype)], dim=1)      # (N, K+1, D)
    candidates = F.normalize(candidates, dim=2).reshape(N * K1, D)                     # (N(K+1), D)
    # log p_b(j, i) = log softmax over all N(K+1) candidates of z_b . c_(j,i) / tau
    log_p = (z @ candidates.T / tau).log_softmax(dim=1)                                # (B, N(K+1))
    B = z.shape[0]
    positives = rank * B + torch.arange(B, device=z.device)                            # (B,) b*
    # keep j = b*: the row's own key and its own neighbors
    return log_p.view(B, N, K1)[torch.arange(B, device=z.device), positives]           # (B, K+1)


def snclr_loss(z: torch.Tensor, keys: torch.Tensor, neighbors: torch.Tensor,
               weights: torch.Tensor, tau: float, rank: int = 0,
               form: str = "code") -> torch.Tensor:
    """Eq. 2, the SNCLR loss over the N*(K+1) candidates, mean over the local batch.

    With p_b(j, i) the softmax of z_b . c_(j,i) / tau over all candidates and w (B, K) the
    positiveness of b's own neighbors (Eq. 4):
      form="paper" (as printed):  L(b) = -log( p_b(b*,0) + sum_i w_bi p_b(b*,i) )
      form="code"  (as released): L(b) = -( log p_b(b*,0) + sum_i w_bi log p_b(b*,i) )
    The code form is a cross-entropy against a soft target: 1 on the own key, w_bi on the own
    neighbors, 0 elsewhere. With all w = 0 (or K = 0) both are InfoNCE (Eq. 1) over the
    enlarged candidate set.

    z (B, D), keys (N, D), neighbors (N, K, D), weights (B, K)  ->  scalar.
    """
    _check(z, keys, tau, rank, neighbors, weights, form)
    log_p = candidate_log_probs(z, keys, neighbors, tau, rank)              # (B, K+1)
    dtype = compute_dtype(log_p, weights)
    log_p, w = log_p.to(dtype), weights.to(dtype)                           # (B, K+1), (B, K)
    if form == "code":
        # L(b) = -( log p(k+) + sum_i w_i log p(NN_i) )
        return -(log_p[:, 0] + (w * log_p[:, 1:]).sum(dim=1)).mean()
    # L(b) = -log( p(k+) + sum_i w_i p(NN_i) ) = -logsumexp(log p(k+), log w_i + log p(NN_i)),
    # stable for small p. log 0 = -inf drops a zero-weight term exactly; the inner where keeps
    # its gradient finite (d log w / dw at w = 0 would be inf * 0 = nan).
    positive = w > 0
    log_w = torch.where(positive, torch.where(positive, w, 1.0).log(), float("-inf"))  # (B, K)
    terms = torch.cat([log_p[:, :1], log_p[:, 1:] + log_w], dim=1)                      # (B, K+1)
    return -terms.logsumexp(dim=1).mean()


def _check(z, keys, tau, rank, neighbors=None, weights=None, form="code") -> None:
    """The inputs' shapes and values; one ValueError line naming what is wrong."""
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"temperature tau must be a finite number > 0, got {tau}")
    if z.dim() != 2 or keys.dim() != 2 or z.shape[1] != keys.shape[1]:
        raise ValueError(f"expected z (B, D) and keys (N, D) with the same D, got "
                         f"{tuple(z.shape)} and {tuple(keys.shape)}")
    B, N, D = z.shape[0], keys.shape[0], keys.shape[1]
    if rank < 0 or (rank + 1) * B > N:
        raise ValueError(f"rank={rank} with local batch B={B} needs keys rows "
                         f"[{rank * B}, {(rank + 1) * B}) but keys has N={N} rows; "
                         f"rank must be in [0, {N // max(B, 1) - 1}]")
    if form not in FORMS:
        raise ValueError(f"unknown loss form {form!r}; choose one of {FORMS}")
    if neighbors is None:
        return
    if neighbors.dim() != 3 or neighbors.shape[0] != N or neighbors.shape[2] != D:
        raise ValueError(f"neighbors must have shape (N={N}, K, D={D}), got {tuple(neighbors.shape)}")
    if tuple(weights.shape) != (B, neighbors.shape[1]):
        raise ValueError(f"weights must have shape (B={B}, K={neighbors.shape[1]}), got {tuple(weights.shape)}")
