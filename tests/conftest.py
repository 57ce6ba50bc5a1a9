"""Shared test helpers and fixtures: tiny model sizes, the smoke run every CLI test reuses,
subprocess and one-line-error helpers."""
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import SNCLR


ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository root


TINY = dict(image_size=16, dim=16, mlp_dim=32)  # small enough for a 2-core CPU


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SMOKE = ["--dataset", "fake", "--arch", "resnet18", "--image-size", "16", "--fake-size", "64",
         "--batch-size", "16", "--queue-size", "32", "-K", "2", "--dim", "16", "--mlp-dim", "32",
         "--workers", "0", "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0", "--device", "cpu"]


def script_command(script):
    """How a user starts one of the project's scripts: `python train.py` for the root's,
    `python -m tools.bench` (with the repository on PYTHONPATH) for a tool's."""
    if script.startswith("tools/"):
        return [sys.executable, "-m", script[:-3].replace("/", ".")]
    return [sys.executable, str(ROOT / script)]


def script_env():
    """This environment with the repository on PYTHONPATH, so `python -m tools.X` runs from any folder."""
    import os
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_cli(script, *args, cwd=ROOT, timeout=600):
    """One of the project's scripts as a real process; its CompletedProcess (text)."""
    return subprocess.run([*script_command(script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=script_env())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    res = run_cli("train.py", *SMOKE, "--epochs", "2", "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    (out / "stdout.txt").write_text(res.stdout)
    return out


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def jpeg_folder(root, classes=("a", "b"), per_class=4, size=(20, 20)):
    """ROOT/{train,val}/<class>/<i>.jpg of random pixels; size is (width, height)."""
    from PIL import Image
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root


def fake_checkpoint(path, arch="resnet18", image_size=16, stem="small", dataset="fake", epoch=1, step=0, seed=0):
    """A train.py checkpoint of an untrained SNCLR: no training needed."""
    torch.manual_seed(seed)
    m = SNCLR(arch, image_size, dim=16, mlp_dim=32, num_neighbors=0, queue_size=8, stem=stem)
    args = dict(arch=arch, image_size=image_size, stem=stem, dataset=dataset, data_path="data", fake_size=64,
                seed=0)
    torch.save({"model": m.state_dict(), "optimizer": {}, "epoch": epoch, "step_in_epoch": step, "args": args},
               path)
    return str(path)


def snapshot(folder) -> dict:
    """Every path under folder (hidden ones too): the SHA-256 of a file's bytes, or what else it is."""
    import hashlib
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): "link" if p.is_symlink() else "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


def fails_in_process(capsys, main, argv, status=None) -> str:
    """Run main(argv) in this process; it must exit non-zero (or with `status`) after one
    `error: ...` line on stderr. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and (status is None or exit_.value.code == status), (argv, exit_.value.code)
    assert err.startswith("error: ") and err.strip().count("\n") == 0, (argv, err)
    return err


def _knn_sets():
    """Train / test TensorDatasets with 37 / 23 items (odd: one shard of each is padded), 5
    classes as noisy centres, so neighbors carry information."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 48, generator=g)
    def make(n):
        y = torch.randint(0, 5, (n,), generator=g)
        x = centres[y] + 2 * torch.randn(n, 48, generator=g)
        return torch.utils.data.TensorDataset(x.view(n, 3, 4, 4), y)
    return make(37), make(23)


class _CountingFlatten(torch.nn.Flatten):
    """Flatten (deterministic features) that counts its calls and may set an event at call n."""
    def __init__(self, event=None, set_at=None):
        super().__init__()
        self.calls, self.event, self.set_at = 0, event, set_at

    def forward(self, x):
        self.calls += 1
        if self.event is not None and self.calls == self.set_at:
            self.event.set()
        return super().forward(x)
