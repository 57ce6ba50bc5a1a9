"""LARS (You et al., 2017), the optimiser of MoCo v3's ResNet recipe, and the parameter groups.

For each weight tensor p with gradient g, weight decay wd, momentum mu and learning rate lr:
    u = g + wd * p
    u = u * eta * ||p|| / ||u||          (trust ratio; 1 when either norm is 0)
    v = mu * v + u;   p = p - lr * v
Biases and normalisation parameters (1-d tensors) get neither weight decay nor the trust
ratio, as in MoCo v3 / BYOL: their scale has no meaning to adapt to.
"""
import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases / norm parameters (neither)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "lars_adapt": False}]


class LARS(torch.optim.Optimizer):
    """The formula above for all parameters of a group at once: each line is one torch._foreach_*
    call over the group's list of tensors (a handful of fused kernels on CUDA, whatever the
    number of parameters), and nothing is read on the host. Parameters without a gradient are
    skipped, their momentum untouched."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                lars_step(params, [p.grad for p in params], [self._buffer(p) for p in params], group)

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        """p's momentum buffer v, zero before its first step (so v = u after it)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def trust_ratios(params: list, updates: list, eta: float) -> list:
    """eta ||p|| / ||u|| for each (p, u), 1 where either norm is 0 -> n 0-d tensors.
    One _foreach_norm over the 2n tensors, then (n,)-vector arithmetic: no host read."""
    n = len(params)
    norms = torch.stack(torch._foreach_norm([*params, *updates]))                  # (2n,)
    p_norm, u_norm = norms[:n], norms[n:]                                          # (n,) each
    ratio = torch.where((p_norm > 0) & (u_norm > 0), eta * p_norm / u_norm, torch.ones_like(p_norm))
    return list(ratio.unbind())                                                    # n x ()


def lars_step(params: list, grads: list, buffers: list, group: dict) -> None:
    """One step of the formula, in place, for lists of parameters, gradients and momentum
    buffers of one group (same device and dtype)."""
    wd, lr, mu = group["weight_decay"], group["lr"], group["momentum"]
    # u = g + wd p: a new list (the gradients stay as they are); without decay or adaptation
    # u is g itself, read only
    updates = torch._foreach_add(grads, params, alpha=wd) if wd or group["lars_adapt"] else grads
    if group["lars_adapt"]:
        # u *= ratio. A list of 0-d factors: on CUDA ATen's foreach fast path needs equal shapes,
        # so this one call launches a kernel per tensor from C++ (as Adam's capturable step does)
        torch._foreach_mul_(updates, trust_ratios(params, updates, group["trust_coefficient"]))
    torch._foreach_mul_(buffers, mu)                                               # v = mu v
    torch._foreach_add_(buffers, updates)                                          #     + u
    torch._foreach_add_(params, buffers, alpha=-lr)                                # p -= lr v
