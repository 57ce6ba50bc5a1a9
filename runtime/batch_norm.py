"""Batch normalisation over the global batch of all ranks, with one all-reduce and no host sync.

With R ranks each holding n local values per channel (n = B * H * W for a (B, C, H, W) input),
the statistics of the global batch of N = R * n values per channel are

    mean = S1 / N,   var = S2 / N - mean^2     (biased, for normalising)
    S1 = sum over ranks and values of x,   S2 = the same of x^2

so one all-reduce of the (2C,) tensor [S1_local, S2_local] gives every rank the global mean
and variance. Every rank must hold the same local batch (options.check_args checks that
--batch-size divides by the world size, and the loaders drop the last partial batch): N is
then R * n, a number known without asking the other ranks. This is the design of detectron2's
NaiveSyncBatchNorm, written anew here.

Why not nn.SyncBatchNorm: its forward drops the statistics of empty inputs with a boolean mask
(`count_all[mask]` in torch/nn/modules/_functions.py), which waits for the GPU at every layer,
and torch.compile breaks its graph at every nn.SyncBatchNorm. Here the all-reduce is a
functional collective (torch.distributed._functional_collectives.all_reduce), which torch.compile
traces into the graph, and its backward pass all-reduces the gradient of [S1, S2]: exactly the
gradient of the sum of every rank's loss through the shared statistics.

In eval mode (running statistics), or in a process without a process group (a plain
`python train.py`), the layer is nn.BatchNorm of the same shape, step for step. A group of one
process (the no-sync test) takes the all-reduce path, which then computes what nn.BatchNorm does.
"""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def _grouped() -> bool:
    """Whether a default process group exists (torch.compile folds the call to a constant)."""
    return dist.is_available() and dist.is_initialized()


def global_sums(x: torch.Tensor) -> torch.Tensor:
    """[S1, S2] of the global batch: per-channel sum and sum of squares of x on every rank.

    x (n, C, *) -> (2, C) float32 (float64 for float64 x), the same on every rank. Summed in at
    least float32: a bf16 sum of 10^5 values loses the variance entirely. Differentiable: the
    backward pass all-reduces the incoming gradient (the collective's autograd formula).
    """
    dims = [0] + list(range(2, x.dim()))
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    local = torch.stack([x.sum(dims), (x * x).sum(dims)])                           # (2, C)
    return AllReduceSum.apply(local) if _grouped() else local                      # (2, C)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks as a functional collective: a new tensor, traced by torch.compile; on
    CUDA the wait orders streams and never blocks the host."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", dist.group.WORLD))


class AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; dL/dx = sum over ranks of dL/dy (each rank's loss depends on
    every rank's x through y). torch >= 2.14 registers this formula for the functional
    all_reduce itself; the Function keeps it on the older releases requirements.txt admits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(grad.contiguous())


class GlobalBatchNorm(_BatchNorm):
    """nn.BatchNorm1d / 2d / 3d whose training statistics are those of the global batch.

    Input (n, C, *) with the same n on every rank; output of x's shape, dtype and memory format.
    Training: y = (x - mean) / sqrt(var + eps) * weight + bias with the global mean and biased
    var (see the module docstring), and, as nn.BatchNorm does,
        running_mean <- (1 - m) running_mean + m mean
        running_var  <- (1 - m) running_var  + m var * N / (N - 1)   (unbiased, N global)
    with m = momentum, or 1 / num_batches_tracked when momentum is None (a cumulative average).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects input (n, C, *) of at least 2 dimensions, "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or not self.track_running_stats  # nn.BatchNorm's own rule
        if not batch_stats or not _grouped():
            return super().forward(x)  # the plain layer: F.batch_norm, fused
        N = x.numel() // x.shape[1] * dist.get_world_size()  # values per channel, all ranks: static
        s1, s2 = global_sums(x)                                                     # (C,) each
        mean = s1 / N
        var = (s2 / N - mean * mean).clamp(min=0)  # rounding can make E[x^2] - mean^2 slightly < 0
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), N)
        scale = torch.rsqrt(var + self.eps)                                         # (C,)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)                                      # broadcast over C
        # x * scale + shift keeps x's memory format (channels_last stays channels_last)
        return (x * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, N: int) -> None:
        """nn.BatchNorm's update, in place, on the device: no value is read on the host."""
        self.num_batches_tracked.add_(1)
        m = self.momentum
        if m is None:  # cumulative moving average: a tensor factor, still no host read
            m = 1.0 / self.num_batches_tracked.to(mean.dtype)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_((var * (N / max(N - 1, 1))).to(self.running_var.dtype), m)


def convert_to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm1d / 2d / 3d (and nn.SyncBatchNorm) in module replaced by a
    GlobalBatchNorm with the same options, parameters, buffers and mode, as
    nn.SyncBatchNorm.convert_sync_batchnorm does; returns the module (the root itself is
    replaced when it is a batch norm). The state dict keeps its keys and values."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight, new.bias = module.weight, module.bias  # the same Parameters
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_batch_norm(child))
    return module

