"""Positiveness w: how much each candidate neighbour counts as a positive (paper Sec. 3.2, Eq. 4).

For a local sample b with online projector output y1_b (B, D) and the K neighbours of its
key NN(k2_b) (B, K, D) taken from the queue (Eq. 3):

    w_bi = softmax_i( f1(y1_b) . f2(NN(k2_b)_i) )                                   (Eq. 4)

The paper calls this a cross-attention with learnable f1, f2 and a scaling factor; the released
code has no parameters at all. Both readings are here, plus two ablations:

  mode        w_bi                                         parameters   gradient into y1
  cosine      softmax_i cos(y1_b, n_bi)    (released code)  none         yes
  attention   softmax_i gamma * f1(^y1_b) . f2(^n_bi)      f1, f2       yes
  hard        1   (every neighbour a full positive)         none         no
  none        0   (neighbours only as extra negatives)      none         no

(^v is v / ||v||.) w is never detached: as in the released code, the loss gradient flows
through w into the online projector output, which nudges w towards the neighbours the
predictor already finds likely.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("cosine", "attention", "hard", "none")


def cosine_positiveness(y: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """Eq. 4 as released: w_bi = softmax_i cos(y_b, n_bi), no parameters, no temperature.

    y (B, D), neighbors (B, K, D) -> w (B, K), each row sums to 1 (an empty row when K = 0).
    Cosines lie in [-1, 1], so w stays close to uniform (1/K): the ratio between the most and
    the least positive neighbour is at most e^2.
    """
    y = F.normalize(y, dim=-1)                                  # (B, D)
    n = F.normalize(neighbors, dim=-1)                          # (B, K, D)
    logits = torch.einsum("bd,bkd->bk", y, n)                   # (B, K) cosines
    return logits.softmax(dim=1)                                # (B, K)


def attention_positiveness(y: torch.Tensor, neighbors: torch.Tensor, f1: nn.Module,
                           f2: nn.Module, gamma: float) -> torch.Tensor:
    """Eq. 4 as printed: w_bi = softmax_i( gamma * f1(^y_b) . f2(^n_bi) ), learnable f1, f2.

    y (B, D), neighbors (B, K, D) -> w (B, K). gamma is the paper's scaling factor, whose value
    it does not give; Positiveness uses gamma = 1 and starts f1, f2 at the identity, so an
    untrained attention module computes exactly the released cosine rule and can then learn
    to sharpen (grow f1, f2) or re-weight feature directions.
    """
    q = f1(F.normalize(y, dim=-1))                              # (B, D) query of the current view
    k = f2(F.normalize(neighbors, dim=-1))                      # (B, K, D) keys of the neighbours
    logits = gamma * torch.einsum("bd,bkd->bk", q, k)           # (B, K)
    return logits.softmax(dim=1)                                # (B, K)


class Positiveness(nn.Module):
    """w (B, K) from the online projector output y (B, D) and neighbours (B, K, D) (Eq. 4).

    threshold=True applies the released code's optional rule: weights below 1/K are set to 0
    (the rest are not renormalised).
    """

    def __init__(self, dim: int, mode: str = "cosine", gamma: float = 1.0, threshold: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown positiveness mode {mode!r}; choose one of {MODES}")
        self.dim, self.mode, self.gamma, self.threshold = dim, mode, gamma, threshold
        if mode == "attention":
            self.f1 = nn.Linear(dim, dim, bias=False)
            self.f2 = nn.Linear(dim, dim, bias=False)
            nn.init.eye_(self.f1.weight)  # identity start = the cosine rule (see docstring above)
            nn.init.eye_(self.f2.weight)

    def forward(self, y: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """Eq. 4: y (B, D) online projector outputs, neighbors (B, K, D) -> w (B, K)."""
        if y.dim() != 2 or neighbors.dim() != 3 or neighbors.shape[0] != y.shape[0] \
                or neighbors.shape[2] != y.shape[1] or y.shape[1] != self.dim:
            raise ValueError(f"positiveness expects y (B, D) and neighbors (B, K, D) with D = dim = "
                             f"{self.dim}, got {tuple(y.shape)} and {tuple(neighbors.shape)}")
        B, K = neighbors.shape[:2]
        if self.mode == "cosine":
            w = cosine_positiveness(y, neighbors)
        elif self.mode == "attention":
            w = attention_positiveness(y, neighbors, self.f1, self.f2, self.gamma)
        elif self.mode == "hard":
            w = y.new_ones(B, K)
        else:  # "none"
            w = y.new_zeros(B, K)
        if self.threshold and K > 0:
            w = torch.where(w >= 1.0 / K, w, torch.zeros_like(w))
        return w                                                 # (B, K)
