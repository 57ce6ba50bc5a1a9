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
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    p_norm, u_norm = torch.norm(p), torch.norm(u)
                    ratio = group["trust_coefficient"] * p_norm / u_norm
                    one = torch.ones_like(p_norm)
                    u = u.mul(torch.where((p_norm > 0) & (u_norm > 0), ratio, one))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                p.add_(v, alpha=-group["lr"])
