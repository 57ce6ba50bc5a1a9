"""The precision the equations compute in: float32 at least, float64 when given float64.

Under bf16 autocast the encoders run in bf16, but cosines in bf16 are off by about 1 %, which
moves w (Eq. 4) and the loss (Eq. 1, 2) visibly; float64 inputs stay float64 so the tests can
check the equations against Python-float loops to 1e-12. Used by positiveness.py, loss.py and model.py.
"""
import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: never below float32 (mixed precision)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
