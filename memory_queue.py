"""The memory queue C of SNCLR and the candidate-neighbor search (paper Sec. 3.1, Eq. 3).

C is a FIFO of L2-normalised momentum-branch projections k = g'(f'(x)). Each step the
training loop first searches C for the K nearest entries of every key (Eq. 3), and only
*after* the loss is computed enqueues this step's gathered view-2 keys, so an image is never
its own neighbor within a step.

Unlike the released code, which starts each GPU's bank from random vectors and never
synchronises it, this queue starts empty, searches only the slots that hold real keys, and is
fed the keys gathered over all ranks, so it is the same tensor on every rank. Its state lives
in persistent buffers, so `model.state_dict()` checkpoints it.

Beside each key the queue keeps the class label of its image (-1 when unknown). SNCLR never
reads them: the search and the loss see only the features (a test checks that the loss does
not depend on them). They exist for the neighbor-quality monitor (monitors/neighbor_quality.py),
which asks how many of the neighbors share the query's class.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MemoryQueue(nn.Module):
    """FIFO of `size` L2-normalised `dim`-dimensional keys.

    Buffers (all persistent, hence checkpointed):
      features (size, dim) the entries; only rows [0, filled) are meaningful
      labels   (size,)     class label of each entry's image, -1 if unknown (monitoring only)
      ptr      ()          the next row to write
      filled   ()          how many rows hold real keys (grows to `size`, then stays)
    Rows are written in order 0, 1, 2, ... and wrap around, so the filled rows are always the
    prefix [0, filled). The fill level is also kept as a Python int, so the training step can
    ask for it without waiting on the GPU (reading `filled` would synchronise host and device).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryQueue needs size >= 1 and dim >= 1, got size={size}, "
                             f"dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._filled = 0  # host copy of `filled`

    def __len__(self) -> int:
        return self._filled

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled = int(self.filled)  # a checkpoint load is the one place the host must ask

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor = None) -> None:
        """C <- keys (n, D) and their labels (n,) (None: -1, unknown) after the newest entry,
        over the oldest (FIFO), wrapping past the end: n need not divide the size."""
        n = keys.shape[0]
        given = None if labels is None else tuple(labels.shape)
        if keys.shape != (n, self.dim) or n > self.size or given not in (None, (n,)):
            raise ValueError(f"enqueue expects keys (n, {self.dim}) and labels (n,) or None with "
                             f"n <= the queue size {self.size} (a queue holds one global batch), "
                             f"got keys {tuple(keys.shape)}, labels {given}")
        # the rows after the newest entry, wrapping: (ptr + 0 .. n-1) mod size
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size    # (n,)
        # C[rows] <- k / ||k||: the oldest entries are overwritten (FIFO)
        self.features[rows] = F.normalize(keys.to(self.features.dtype), dim=1)     # (n, D)
        self.labels[rows] = -1 if labels is None else labels.to(self.labels)       # (n,)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
        self._filled = min(self._filled + n, self.size)

    @torch.no_grad()
    def nearest_indices(self, k: torch.Tensor, K: int) -> torch.Tensor:
        """Eq. 3: NN(k) = the K entries c of C with the largest cos(k, c), most similar first.

        keys k (B, D), C's dtype -> (B, K) rows of C (C[rows]: the neighbors, (B, K, D)). Only
        filled rows are searched, so K <= len(C); K = 0 gives (B, 0)."""
        if not 0 <= K <= self._filled:
            raise ValueError(f"asked for K={K} neighbors but the queue holds {self._filled} "
                             f"entries (size {self.size}); K must be in [0, {self._filled}]")
        # cos(k_b, c) for every filled entry c of C (the entries are unit vectors)
        cos = F.normalize(k, dim=1) @ self.features[:self._filled].T             # (B, filled)
        # NN(k_b) = top-K_c cos(k_b, c)
        return cos.topk(K, dim=1).indices                                          # (B, K)
