"""Checkpoints: plain tensors and dicts, written atomically, read with weights_only=True.

train.py's checkpoint.pth holds {"model", "optimizer", "scaler", "epoch", "step_in_epoch",
"knn_random_init", "args"}; eval_linear.py's its own classifier state. Anything that is not such a file, is
truncated, or describes another model fails with one ConfigError line naming what was expected.
"""
import json
import os

import torch


class ConfigError(Exception):
    """Bad options or an unusable checkpoint; the message names the value and what is allowed."""


def save_checkpoint(path: str, state: dict) -> None:
    """Plain tensors and dicts (loadable with weights_only=True), written atomically."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated file behind


def load_checkpoint(path: str, expect: dict = None, required=("model", "optimizer", "epoch", "args")) -> dict:
    """Read a checkpoint with weights_only=True; ConfigError with one clear line if it is unusable.

    expect maps args entries to the values this run needs (e.g. {"arch": "resnet50"}).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or an unsafe pickle
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}")
    if not isinstance(ckpt, dict) or not set(required) <= set(ckpt):
        raise ConfigError(f"{path} is not a checkpoint of this project (expected keys {', '.join(required)})")
    for key, want in (expect or {}).items():
        if ckpt["args"].get(key) != want:
            raise ConfigError(f"checkpoint {path} has {key}={ckpt['args'].get(key)!r} but "
                              f"{key}={want!r} was asked for")
    return ckpt


def load_state(module, state: dict, what: str) -> None:
    """Strict load_state_dict whose failure is a one-line ConfigError."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{what} does not fit: {str(e).splitlines()[0]}") from None


def append_json(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")

