"""LARS (runtime/lars.py): the foreach update against its formula, one parameter at a time."""
import pytest
import torch

import train
from model import SNCLR
from runtime import options
from runtime.lars import LARS


def loop_lars(params, grads, velocity, lr, wd, mu, eta, adapt):
    """runtime/lars.py's docstring formula, one parameter at a time, in place on params / velocity."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        u = g + wd * p
        if adapt:
            p_norm, u_norm = p.norm(), u.norm()
            u = u * (eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
        velocity[i] = mu * velocity[i] + u
        params[i] = p - lr * velocity[i]


def test_foreach_lars_equals_the_per_parameter_formula_in_float64():
    """Four steps of LARS on two groups (decayed + adapted, and neither) against loop_lars, in
    float64 to 1e-12: with a zero parameter (ratio 1), a zero gradient and zero decay (ratio 1),
    a parameter without gradient (skipped: unchanged, no momentum state), lr and momentum
    changed between steps as train.py's schedule changes lr."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3), (5, 4), (6, 5), (7,), (5,), (2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        params[1].zero_()                                     # a zero weight: ||p|| = 0
    decayed, plain = params[:3] + [params[5]], params[3:5]
    opt = LARS([{"params": decayed, "weight_decay": 0.1, "lars_adapt": True},
                {"params": plain, "weight_decay": 0.0, "lars_adapt": False}], momentum=0.9, trust_coefficient=0.02)
    ref = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in params]
    for step in range(4):
        lr = 0.5 + 0.25 * step
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        grads[2] = torch.zeros_like(grads[2])                 # a zero gradient (and u = wd p != 0)
        grads[5] = None                                       # no gradient: skipped
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr, 0.9 - 0.1 * step
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        ids = {id(p): i for i, p in enumerate(params)}
        for group, (wd, adapt) in zip(opt.param_groups, ((0.1, True), (0.0, False))):
            idx = [ids[id(p)] for p in group["params"]]
            sub_p, sub_v = [ref[i] for i in idx], [velocity[i] for i in idx]
            loop_lars(sub_p, [grads[i] for i in idx], sub_v, lr, wd, 0.9 - 0.1 * step, 0.02, adapt)
            for j, i in enumerate(idx):
                ref[i], velocity[i] = sub_p[j], sub_v[j]
        for i, p in enumerate(params):
            assert torch.allclose(p.detach(), ref[i], rtol=0, atol=1e-12), (step, i)
    assert params[5] not in opt.state                         # never had a gradient: no buffer
    assert torch.equal(params[5].detach(), ref[5])


def test_foreach_lars_with_a_zero_update_keeps_the_parameter():
    """u = 0 (zero gradient, no decay, adapted): ratio 1, v = mu v, no NaN from 0 / 0."""
    p = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
    opt = LARS([{"params": [p], "weight_decay": 0.0, "lars_adapt": True}], lr=1.0, momentum=0.9)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, 2, dtype=torch.float64))



@pytest.mark.parametrize("arch", ["resnet50", "vit_small"])
def test_lars_groups_hold_weights_apart_from_biases_and_norms(arch):
    """MoCo v3's LARS as train.py builds it: every weight matrix / kernel (and the ViT class
    token) decayed and adapted; every bias and every norm layer's parameter neither. The
    expected split is found by module type and name here, not by the shape rule lars.py uses."""
    args = options.parse_args(["--arch", arch, "--optimizer", "lars", "--weight-decay", "1e-4"])
    model = SNCLR(arch, 32, dim=16, mlp_dim=32, num_neighbors=0, queue_size=8)
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm)
    plain = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    plain |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}  # in_proj_bias too
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(model, args)
    assert isinstance(optimizer, LARS) and len(optimizer.param_groups) == 2
    adapted, fixed = optimizer.param_groups
    assert (adapted["weight_decay"], adapted["lars_adapt"]) == (1e-4, True)
    assert (fixed["weight_decay"], fixed["lars_adapt"]) == (0.0, False)
    assert {id(p) for p in fixed["params"]} == plain & {id(p) for p in trained}
    assert {id(p) for p in adapted["params"]} == {id(p) for p in trained} - plain
    assert not any(p is q for p in model.momentum_parameters() for q in adapted["params"] + fixed["params"])
