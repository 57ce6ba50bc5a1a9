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
not depend on them). They exist for the neighbor-quality monitor (neighbor_monitor.py),
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
            raise ValueError(f"MemoryQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._filled = 0  # host copy of `filled`

    def __len__(self) -> int:
        return self._filled

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "features" in state_dict and prefix + "labels" not in state_dict:
            state_dict[prefix + "labels"] = torch.full_like(self.labels, -1)  # a checkpoint from before labels
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled = int(self.filled)  # a checkpoint load is the one place the host must ask

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor = None) -> None:
        """Write keys (n, dim) and their labels (n,) after the newest entry, overwriting the
        oldest ones (FIFO).

        The rows written are (ptr + 0 .. n-1) mod size, so a batch that runs past the end of the
        buffer wraps to its start; n need not divide `size`. labels=None stores -1 (unknown).
        """
        self._check_enqueue(keys, labels)
        n = keys.shape[0]
        # the rows after the newest entry, wrapping: (ptr + 0 .. n-1) mod size
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size    # (n,)
        # C[rows] <- k / ||k||: the oldest entries are overwritten (FIFO)
        self.features[rows] = F.normalize(keys.detach().to(self.features.dtype), dim=1)  # (n, dim)
        self.labels[rows] = -1 if labels is None else labels.to(self.labels)        # (n,)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
        self._filled = min(self._filled + n, self.size)

    @torch.no_grad()
    def nearest_indices(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of the k entries with the largest cosine to each query: (B, dim) -> (B, k)."""
        self._check_search(query, k)
        if k == 0:  # K = 0 (InfoNCE) or a queue still too short: nothing to search
            return torch.empty(query.shape[0], 0, dtype=torch.long, device=query.device)
        q = F.normalize(query.detach().to(self.features.dtype), dim=1)  # ^q  (B, dim)
        # cos(q, c) for every filled entry c of C (entries are unit vectors)
        sim = q @ self.features[:self._filled].T                         # (B, filled)
        # NN(q) = the k entries with the largest cosine, most similar first
        return sim.topk(k, dim=1).indices                                # (B, k)

    @torch.no_grad()
    def nearest_neighbors(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """Eq. 3: NN(q) = the k entries c of C with the largest cos(q, c).

        query (B, dim) -> neighbors (B, k, dim), unit norm, most similar first. Only filled
        slots are searched; k larger than the number of filled slots is an error.
        """
        return self.features[self.nearest_indices(query, k)]  # (B, k, dim)

    def _check_enqueue(self, keys: torch.Tensor, labels) -> None:
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"enqueue expects keys of shape (n, {self.dim}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of size {self.size}; "
                             f"use a queue at least as large as the global batch")
        if labels is not None and tuple(labels.shape) != (n,):
            raise ValueError(f"enqueue expects labels of shape ({n},), got {tuple(labels.shape)}")

    def _check_search(self, query: torch.Tensor, k: int) -> None:
        if query.dim() != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must have shape (B, {self.dim}), got {tuple(query.shape)}")
        if not 0 <= k <= self._filled:
            raise ValueError(f"asked for k={k} neighbors but the queue holds {self._filled} entries "
                             f"(size {self.size}); k must be in [0, {self._filled}]")
