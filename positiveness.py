"""Positiveness w: how much each candidate neighbor counts as a positive (paper Sec. 3.2, Eq. 4).

For a local sample b with online projector output y1_b (B, D) and the K neighbors of its
key NN(k2_b) (B, K, D) taken from the queue (Eq. 3):

    w_bi = softmax_i( f1(y1_b) . f2(NN(k2_b)_i) )                                   (Eq. 4)

The paper calls this a cross-attention with learnable f1, f2 and a scaling factor; the released
code has no parameters at all. Both readings are here, plus two ablations:

  mode        w_bi                                          parameters        gradient into y1
  cosine      softmax_i cos(y1_b, n_bi) / t   (released: t=1) none              yes
  attention   softmax_i gamma * f1(^y1_b) . f2(^n_bi)       f1, f2 (+ gamma)  yes
  hard        1   (every neighbor a full positive)          none              no
  none        0   (neighbors only as extra negatives)       none              no

(^v is v / ||v||.) Cosines lie in [-1, 1], so the released rule (t = 1) keeps w within a
factor e^2 of uniform: measured w stays within 1/K +- 0.003 at K = 5. The two sharper options
are the temperature t of the cosine rule (t < 1 sharpens, as a contrastive temperature does)
and, for attention, the paper's scaling factor gamma learned (log-parameterised, starting at
1). w is never detached: as in the released code, the loss gradient flows through w into the
online projector output, which nudges w towards the neighbors the predictor already finds
likely.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from precision import compute_dtype

MODES = ("cosine", "attention", "hard", "none")


def cosine_positiveness(y: torch.Tensor, neighbors: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """Eq. 4 as released, with a temperature: w_bi = softmax_i( cos(y_b, n_bi) / t ).

    y (B, D), neighbors (B, K, D) -> w (B, K), each row sums to 1 (an empty row when K = 0).
    t = 1 is the released code (no temperature). Computes in at least float32.
    """
    dtype = compute_dtype(y, neighbors)
    y = F.normalize(y.to(dtype), dim=-1)                        # ^y_b        (B, D)
    n = F.normalize(neighbors.to(dtype), dim=-1)                # ^NN(k)_bi   (B, K, D)
    # w_bi = softmax_i( ^y_b . ^NN(k)_bi / t )
    logits = torch.einsum("bd,bkd->bk", y, n) / t               # (B, K)
    return logits.softmax(dim=1)                                # (B, K)


def attention_positiveness(y: torch.Tensor, neighbors: torch.Tensor, f1: torch.Tensor,
                           f2: torch.Tensor, gamma) -> torch.Tensor:
    """Eq. 4 as printed: w_bi = softmax_i( gamma * f1(^y_b) . f2(^n_bi) ), learnable f1, f2.

    y (B, D), neighbors (B, K, D), f1, f2 (D, D) linear maps -> w (B, K). gamma is the paper's
    scaling factor (a float, or a 0-d tensor when it is learned). Positiveness starts f1, f2 at
    the identity and gamma at 1, so an untrained attention module computes exactly the released
    cosine rule.
    """
    dtype = compute_dtype(y, neighbors, f1)
    q = F.linear(F.normalize(y.to(dtype), dim=-1), f1.to(dtype))          # f1(^y_b)      (B, D)
    k = F.linear(F.normalize(neighbors.to(dtype), dim=-1), f2.to(dtype))  # f2(^NN_bi)    (B, K, D)
    # w_bi = softmax_i( gamma * f1(^y_b) . f2(^NN_bi) )
    logits = gamma * torch.einsum("bd,bkd->bk", q, k)           # (B, K)
    return logits.softmax(dim=1)                                # (B, K)


class Positiveness(nn.Module):
    """w (B, K) from the online projector output y (B, D) and neighbors (B, K, D) (Eq. 4).

    temperature: t of the cosine rule (1 = released). learn_gamma: attention only, gamma =
    exp(log_gamma) with log_gamma a parameter starting at 0 (gamma = 1); the log keeps gamma
    positive, so a larger gamma always means sharper w. threshold=True applies the released
    code's optional rule: weights below 1/K are set to 0 (the rest are not renormalised).
    """

    def __init__(self, dim: int, mode: str = "cosine", temperature: float = 1.0,
                 learn_gamma: bool = False, threshold: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown positiveness mode {mode!r}; choose one of {MODES}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"positiveness temperature must be a finite number > 0, got {temperature}")
        if temperature != 1.0 and mode != "cosine":
            raise ValueError(f"a positiveness temperature applies to mode 'cosine' only, not {mode!r} "
                             f"(attention has its own scale: learn_gamma)")
        if learn_gamma and mode != "attention":
            raise ValueError(f"learn_gamma applies to mode 'attention' only, not {mode!r}")
        self.dim, self.mode, self.temperature, self.threshold = dim, mode, temperature, threshold
        if mode == "attention":
            self.f1 = nn.Linear(dim, dim, bias=False)
            self.f2 = nn.Linear(dim, dim, bias=False)
            nn.init.eye_(self.f1.weight)  # identity start = the cosine rule (see docstring above)
            nn.init.eye_(self.f2.weight)
            self.log_gamma = nn.Parameter(torch.zeros(())) if learn_gamma else None

    @property
    def gamma(self):
        """The attention scale: exp(log_gamma) when learned, else 1."""
        return self.log_gamma.exp() if getattr(self, "log_gamma", None) is not None else 1.0

    def forward(self, y: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """Eq. 4: y (B, D) online projector outputs, neighbors (B, K, D) -> w (B, K)."""
        self._check(y, neighbors)
        B, K = neighbors.shape[:2]
        if self.mode == "cosine":
            w = cosine_positiveness(y, neighbors, self.temperature)
        elif self.mode == "attention":
            w = attention_positiveness(y, neighbors, self.f1.weight, self.f2.weight, self.gamma)
        elif self.mode == "hard":
            w = y.new_ones(B, K, dtype=compute_dtype(y))
        else:  # "none"
            w = y.new_zeros(B, K, dtype=compute_dtype(y))
        if self.threshold and K > 0:  # released option: w_bi = 0 where w_bi < 1/K (kept at = 1/K)
            w = torch.where(w >= 1.0 / K, w, torch.zeros_like(w))
        return w                                                 # (B, K)

    def _check(self, y: torch.Tensor, neighbors: torch.Tensor) -> None:
        if y.dim() != 2 or neighbors.dim() != 3 or neighbors.shape[0] != y.shape[0] \
                or neighbors.shape[2] != y.shape[1] or y.shape[1] != self.dim:
            raise ValueError(f"positiveness expects y (B, D) and neighbors (B, K, D) with D = dim = "
                             f"{self.dim}, got {tuple(y.shape)} and {tuple(neighbors.shape)}")
