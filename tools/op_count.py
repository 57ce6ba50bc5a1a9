"""How many aten operators a function runs, and how many bytes they touch: the launch budget of
a GPU step, counted on any device (tools/bench.py --count-ops prints it).

On a GPU each non-view aten operator is (at least) one kernel launch, a few microseconds of host
time each; when a step's operators outnumber what the GPU can absorb in that time, the step is
launch-bound, whatever the FLOPs. Views (reshape, expand, slicing) launch nothing and are not
counted. Bytes are the sizes of each operator's tensor inputs and outputs: an upper bound on its
memory traffic before any fusion (a fused kernel reads and writes each tensor once).
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """with OpCounter() as c: fn() -> c.ops (non-view aten operators run), c.bytes (their tensor
    inputs plus outputs), c.by_name (a Counter of operator names)."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.by_name = 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops += 1
            self.bytes += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
            self.by_name[func.__name__] += 1
        return out


def count_ops(fn) -> OpCounter:
    """Run fn() once under an OpCounter and return it."""
    with OpCounter() as counter:
        fn()
    return counter
