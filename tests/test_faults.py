"""Faults a careless user or an unlucky machine brings, outside train.py: each is
reproduced as a real process where a process is what fails (a hang, a traceback, a lost file),
with a timeout, and checked to end with one `error:` line and nothing written.
`pytest tests/test_faults.py`."""
import errno
import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from runtime.checkpoint import read_log
from conftest import ROOT, fails_in_process, fake_checkpoint, jpeg_folder, script_command, script_env, snapshot
from conftest import run_cli as run_script

HANG = 120  # seconds: a process that has printed its error and not exited by then hangs


def run_cli(script, *args, cwd=ROOT, timeout=HANG):
    return run_script(script, *args, cwd=cwd, timeout=timeout)


def one_error_line(res, status=1) -> str:
    """The process exited with `status` after exactly one `error:` line on stderr: that line."""
    assert res.returncode == status, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    return lines[0]


def write_idx(path, array: np.ndarray) -> None:
    """array (uint8) as an IDX file: 0, 0, type 0x08, ndim, big-endian sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def fashion_files(root, n=5, labels=None, images=None):
    """The four Fashion-MNIST IDX files of n images in root."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", g.integers(0, 255, (n, 28, 28)) if images is None else images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10 if labels is None else labels)
    return root


EVAL = ["--device", "cpu", "--batch-size", "8"]


# ---------------------------------------------------------- no hang after a data error ---
@pytest.mark.parametrize("mode", [["--knn"], ["--epochs", "1"]])
def test_an_unreadable_test_image_with_workers_ends_with_one_line(tmp_path, mode):
    """A zero-byte validation JPEG, read by DataLoader workers (which ignore SIGTERM): the error
    line, then the process exits (workers included)."""
    data = jpeg_folder(tmp_path / "data")
    (data / "val" / "b" / "0.jpg").write_bytes(b"")
    ckpt = fake_checkpoint(tmp_path / "c.pth")
    before = snapshot(data)
    res = run_cli("eval_linear.py", ckpt, *mode, "--dataset", "folder", "--data-path", str(data), "--workers", "2",
                  *EVAL, "--output-dir", str(tmp_path / "out"))
    assert f"error: cannot read image {data}/val/b/0.jpg" in one_error_line(res)
    assert snapshot(data) == before


# ---------------------------------------------------- a probe resumes only its own run ---
def test_a_probe_resumes_only_with_the_same_options_and_backbone(tmp_path, capsys):
    import eval_linear
    ckpt, out = fake_checkpoint(tmp_path / "c.pth"), tmp_path / "probe"
    common = [ckpt, *EVAL, "--workers", "0", "--output-dir", str(out)]
    first = eval_linear.main([*common, "--epochs", "1"])
    assert first["pretrain_epoch"] == 1 and first["pretrain_step_in_epoch"] == 0
    saved = snapshot(out)
    for changed, shown in [(["--epochs", "2"], "epochs: 1 -> 2"), (["--epochs", "1", "--lr", "0.5"], "lr: None -> 0.5"),
                           (["--epochs", "1", "--batch-size", "16"], "batch_size: 8 -> 16")]:
        err = fails_in_process(capsys, eval_linear.main, [*common, *changed])
        assert "was written with other options" in err and shown in err and "--allow-changed-args" in err, err
        assert snapshot(out) == saved
    eval_linear.main([*common, "--epochs", "2", "--allow-changed-args"])
    assert "resumed with a changed option (--allow-changed-args): epochs: 1 -> 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 2] and log[1]["changed_args"] == ["epochs: 1 -> 2"]


def test_a_probe_refuses_a_backbone_rewritten_since_it_began(tmp_path):
    """The checkpoint rewritten at the same epoch (another run into the same folder): one line
    at resume time, not a RuntimeError after the whole probe."""
    import eval_linear
    ckpt, out = fake_checkpoint(tmp_path / "c.pth"), tmp_path / "probe"
    eval_linear.main([ckpt, *EVAL, "--workers", "0", "--epochs", "1", "--output-dir", str(out)])
    fake_checkpoint(tmp_path / "c.pth", seed=1)
    saved = snapshot(tmp_path)
    res = run_cli("eval_linear.py", ckpt, *EVAL, "--workers", "0", "--epochs", "2", "--output-dir", str(out))
    line = one_error_line(res)
    assert f"the backbone weights in {ckpt} changed since {out}/checkpoint.pth began evaluating them" in line
    assert snapshot(tmp_path) == saved


# ------------------------------------------------------------------- one probe per folder ---
def test_a_second_evaluation_into_a_held_folder_is_refused(tmp_path):
    ckpt, out = fake_checkpoint(tmp_path / "c.pth"), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
                               f"from runtime.checkpoint import RunLock; lock = RunLock({str(out)!r}, 'evaluation'); "
                               f"print(1, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        saved = snapshot(out)
        res = run_cli("eval_linear.py", ckpt, "--knn", *EVAL, "--workers", "0", "--output-dir", str(out))
        assert f"{out} is in use by a running evaluation (pid {holder.pid})" in one_error_line(res)
        assert snapshot(out) == saved
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- full disk ---
class FillsUp:
    """A binary file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data)[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def disk_with_room(monkeypatch, room: int, suffix: str = "") -> None:
    """runtime/checkpoint.py's binary writes to files whose name ends with suffix fail after room bytes."""
    from runtime import checkpoint

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return FillsUp(f, room) if "b" in mode and str(path).endswith(suffix) else f
    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


def test_a_disk_that_fills_mid_save_gives_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """torch.save's own writer reports the file's ENOSPC as "[enforce fail at inline_container.cc]
    unexpected pos": recognised as a full disk, with the room the save needs."""
    from runtime.checkpoint import ConfigError, save_checkpoint, write_json
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(str(path), {"x": torch.zeros(10)})
    previous = path.read_bytes()
    disk_with_room(monkeypatch, 100_000)
    with pytest.raises(ConfigError) as error:
        save_checkpoint(str(path), {"x": torch.zeros(2**20)})
    assert str(error.value).startswith(f"no space left on {tmp_path}: saving checkpoint.pth needs about 4 MiB "
                                       f"free beside the previous checkpoint.pth"), error.value
    assert str(error.value).endswith("free some space and rerun to resume")
    assert path.read_bytes() == previous and not (tmp_path / "checkpoint.pth.tmp").exists()
    disk_with_room(monkeypatch, 1000)
    with pytest.raises(ConfigError, match="saving args.json needs about 4 KiB free"):
        write_json(str(tmp_path / "args.json"), {"x": "y" * 4000})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    with FillsUp(open(tmp_path / "raw.pth", "wb"), 100_000) as f, pytest.raises(RuntimeError, match="enforce fail"):
        torch.save({"x": torch.zeros(2**20)}, f)                  # torch's own message, unhandled


def test_a_full_disk_at_results_keeps_the_printed_figure(tmp_path, monkeypatch, capsys):
    import eval_linear
    ckpt, out = fake_checkpoint(tmp_path / "c.pth"), tmp_path / "out"
    disk_with_room(monkeypatch, 10, "results.txt")
    with pytest.raises(SystemExit) as exit_:
        eval_linear.main([ckpt, "--knn", *EVAL, "--workers", "0", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"error: no space left on {out}: saving results.txt needs about")
    assert "the result is printed above" in captured.err
    assert 0 <= json.loads(captured.out.splitlines()[-1])["top1"] <= 100       # the figure is not lost
    assert not (out / "results.txt").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped elsewhere), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def fill(folder, leave: int = 0) -> None:
    """Fill a file system but for about `leave` bytes."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    if leave:
        os.truncate(folder / "filler", os.path.getsize(folder / "filler") - leave)


def test_a_real_small_disk_fills_mid_export_with_one_line(tmp_path, small_disk):
    ckpt = fake_checkpoint(tmp_path / "c.pth")
    res = run_cli("eval_linear.py", ckpt, "--export", str(small_disk / "backbone.pth"))
    line = one_error_line(res)
    assert line.startswith(f"error: no space left on {small_disk}: saving backbone.pth needs about 43 MiB free"), line
    assert "resum" not in line and "choose another --export path" in line
    assert os.listdir(small_disk) == []


def test_a_full_disk_at_the_lock_json_and_log_leaves_no_file(small_disk):
    from runtime.checkpoint import ConfigError, RunLock, append_json, write_json
    append_json(str(small_disk / "log.txt"), {"epoch": 1})
    kept = (small_disk / "log.txt").read_bytes()
    fill(small_disk)
    for write, name in [(lambda: RunLock(str(small_disk)), ".lock"),
                        (lambda: write_json(str(small_disk / "args.json"), {"a": 1}), "args.json"),
                        (lambda: append_json(str(small_disk / "log.txt"), {"epoch": 2, "x": "y" * 5000}), "log.txt")]:
        with pytest.raises(ConfigError, match=f"no space left on {small_disk}: saving {name} needs about"):
            write()
    assert sorted(os.listdir(small_disk)) == ["filler", "log.txt"] and (small_disk / "log.txt").read_bytes() == kept


# -------------------------------------------------------------- wrong data, one line ---
def test_a_validation_folder_without_a_training_class_is_refused(tmp_path):
    data = jpeg_folder(tmp_path / "data", classes=("a", "b", "c"))
    for f in (data / "val" / "b").iterdir():
        f.unlink()
    (data / "val" / "b").rmdir()
    ckpt, saved = fake_checkpoint(tmp_path / "c.pth"), snapshot(tmp_path)
    message = f"error: {data}/train and {data}/val must hold the same class folders"
    res = run_cli("eval_linear.py", ckpt, "--knn", "--dataset", "folder", "--data-path", str(data), *EVAL,
                  "--workers", "0", "--output-dir", str(tmp_path / "out"))
    assert one_error_line(res).startswith(message) and res.stderr.strip().endswith(f"{data}/val lacks b")
    res = run_cli("train.py", "--dataset", "folder", "--data-path", str(data), "--arch", "resnet18", "--image-size",
                  "16", "--batch-size", "4", "--device", "cpu", "--workers", "0", "--output-dir", str(tmp_path / "run"))
    assert one_error_line(res).startswith(message)
    assert snapshot(tmp_path) == saved


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((5, 28, 28)), np.arange(4), "train-labels-idx1-ubyte holds labels of shape (4,) for the 5 images"),
    (np.zeros((5, 28, 28)), np.arange(6), "train-labels-idx1-ubyte holds labels of shape (6,) for the 5 images"),
    (np.zeros((5, 28, 28)), [0, 1, 2, 3, 12], "train-labels-idx1-ubyte holds the label 12; Fashion-MNIST's labels"),
    (np.zeros(5 * 28 * 28), np.arange(5), "train-images-idx3-ubyte holds an array of shape (3920,)"),
])
def test_inconsistent_fashion_mnist_files_are_named(tmp_path, images, labels, message):
    from images.datasets import DataError, FashionMNIST
    root = fashion_files(tmp_path / "f", images=images, labels=labels)
    with pytest.raises(DataError, match=r"^" + str(root).replace("/", r"\/") + "/" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        FashionMNIST(str(root), train=True)


def test_inconsistent_fashion_mnist_files_end_a_process_with_one_line(tmp_path):
    root = fashion_files(tmp_path / "f", labels=np.arange(4))
    ckpt, saved = fake_checkpoint(tmp_path / "c.pth", dataset="fashion-mnist"), snapshot(tmp_path)
    res = run_cli("eval_linear.py", ckpt, "--knn", "--data-path", str(root), *EVAL, "--workers", "2",
                  "--output-dir", str(tmp_path / "out"))
    assert f"{root}/train-labels-idx1-ubyte holds labels of shape (4,) for the 5 images" in one_error_line(res)
    assert snapshot(tmp_path) == saved


def test_export_to_an_empty_name_is_an_error_not_a_probe(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c.pth")
    saved = snapshot(tmp_path)
    res = run_cli("eval_linear.py", ckpt, "--export", "", "--device", "cpu")
    assert one_error_line(res) == "error: --export needs a file name, e.g. --export backbone.pth"
    assert snapshot(tmp_path) == saved and not (tmp_path / "eval_linear").exists()


def test_ablations_refuse_a_partial_run_of_another_budget(tmp_path, capsys):
    from tools import ablations
    (tmp_path / "runs" / "cosine_s0").mkdir(parents=True)
    (tmp_path / "runs" / "cosine_s0" / "args.json").write_text(json.dumps({"epochs": 5}))
    saved = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        ablations.main(["--epochs", "2", "--seeds", "0", "--only", "cosine", "--runs", str(tmp_path / "runs"),
                        "--results", str(tmp_path / "results")])
    assert str(exit_.value.code).startswith(f"error: {tmp_path}/runs/cosine_s0 holds a run of --epochs 5, this "
                                            f"sweep asks for --epochs 2; delete")
    assert snapshot(tmp_path) == saved


# -------------------------------------------------------- one line, not a traceback ---
def test_non_square_folder_images_at_small_sizes_evaluate(tmp_path):
    from PIL import Image
    from images.datasets import eval_transform
    for train in (False, True):
        assert eval_transform("folder", 16, train)(Image.new("RGB", (30, 20))).shape == (3, 16, 16)
    data = jpeg_folder(tmp_path / "data", size=(30, 20))
    res = run_cli("eval_linear.py", fake_checkpoint(tmp_path / "c.pth"), "--knn", "--dataset", "folder",
                  "--data-path", str(data), *EVAL, "--workers", "0", "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 0 and 0 <= json.loads(res.stdout.splitlines()[-1])["top1"] <= 100, res.stderr[-2000:]


def test_a_decompression_bomb_is_skipped_and_counted_or_named(tmp_path, monkeypatch):
    from PIL import Image
    from images.datasets import DataError, SkipUnreadable, build_dataset
    data = jpeg_folder(tmp_path / "data")
    Image.new("1", (40, 40)).save(data / "train" / "a" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)          # 1600 pixels: over twice the limit
    train = build_dataset("folder", str(data), True, None)
    lenient, strict = SkipUnreadable(train), SkipUnreadable(train, strict=True)
    bomb = [i for i, (p, _) in enumerate(train.samples) if p.endswith("bomb.png")][0]
    lenient[bomb]
    assert lenient.skipped.value == 1
    with pytest.raises(DataError, match=f"cannot read image {data}/train/a/bomb.png: Image size"):
        strict[bomb]


def test_a_real_decompression_bomb_in_the_training_set_is_skipped(tmp_path):
    from PIL import Image
    data = jpeg_folder(tmp_path / "data")
    Image.new("1", (20000, 10000)).save(data / "train" / "a" / "bomb.png")   # 2e8 pixels: PIL refuses it
    res = run_cli("eval_linear.py", fake_checkpoint(tmp_path / "c.pth"), "--knn", "--dataset", "folder",
                  "--data-path", str(data), *EVAL, "--workers", "0", "--output-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"warning: skipping unreadable training image {data}/train/a/bomb.png: Image size" in res.stderr


@pytest.mark.parametrize("out, message", [("/proc/x", "--out /proc/x cannot be written (No such file or directory)"),
                                          ("FILE/sub", "--out FILE/sub cannot be written (Not a directory)")])
def test_bench_checks_its_output_folder_before_the_benchmark(tmp_path, out, message):
    (tmp_path / "a_file").write_text("")
    out, message = (s.replace("FILE", str(tmp_path / "a_file")) for s in (out, message))
    res = run_cli("tools/bench.py", "--out", out, "--device", "cpu", timeout=60)   # the benchmark would take minutes
    assert message in one_error_line(res, status=2)
    assert not os.path.exists(out) and (tmp_path / "a_file").read_text() == ""


def test_ablations_from_another_folder_end_with_the_error_line_of_train(tmp_path):
    res = run_cli("tools/ablations.py", "--epochs", "1", "--seeds", "0", "--only", "cosine", "--device", "cpu",
                  "--train-args", "--batch-size 0", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: argument --batch-size: must be a finite number > 0")
    assert f"{ROOT}/train.py" in res.stdout and not (tmp_path / "results" / "ablation_cosine_s0.json").exists()


# ---------------------------------------------------------- the words of two messages ---
def test_random_bytes_are_not_a_checkpoint(tmp_path):
    from runtime.checkpoint import ConfigError, load_checkpoint
    g = np.random.default_rng(0)
    for i in range(200):  # some random bytes read as pickle opcodes that the safe loader refuses
        (tmp_path / "r.pth").write_bytes(bytes([0x80, 2]) * (i % 2) + g.bytes(300))
        with pytest.raises(ConfigError, match="it is not a torch checkpoint file, or it is truncated"):
            load_checkpoint(str(tmp_path / "r.pth"))
    res = run_cli("eval_linear.py", str(tmp_path / "r.pth"), "--output-dir", str(tmp_path / "o"))
    assert "it is not a torch checkpoint file" in one_error_line(res)


def test_a_mid_epoch_checkpoint_is_reported_with_its_step(tmp_path):
    import eval_linear
    ckpt = fake_checkpoint(tmp_path / "c.pth", epoch=1, step=3)
    result = eval_linear.main([ckpt, "--knn", *EVAL, "--workers", "0", "--output-dir", str(tmp_path / "o")])
    assert (result["pretrain_epoch"], result["pretrain_step_in_epoch"]) == (1, 3)


# ---------------------------------------------------- where Fashion-MNIST comes from ---
def test_fashion_mnist_from_the_asked_folder_debian_or_a_download(tmp_path, monkeypatch):
    """Never a real download: torchvision's class is replaced by one that writes the files
    where torchvision would (ROOT/FashionMNIST/raw), or fails as without a network."""
    import urllib.error
    from images import datasets
    debian = tmp_path / "debian"
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEB", str(debian))

    class Downloads:
        def __init__(self, root, train, download):
            fashion_files(pathlib.Path(root) / "FashionMNIST" / "raw")

    class NoNetwork:
        def __init__(self, root, train, download):
            (pathlib.Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got:\n"
                               "<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(datasets.torchvision.datasets, "FashionMNIST", NoNetwork)
    monkeypatch.chdir(tmp_path)                                    # DEFAULT_ROOT ("data") is relative
    with pytest.raises(datasets.DataError, match=f"no Fashion-MNIST in {debian} nor under 'data'"):
        datasets.fashion_mnist_root(None, True)
    assert not (tmp_path / "data").exists()
    asked = tmp_path / "asked"
    for download in (False, True):
        with pytest.raises(datasets.DataError) as error:
            datasets.fashion_mnist_root(str(asked), download)
        assert "install Debian's package dataset-fashion-mnist" in str(error.value)
        assert f"where a network exists to download it into {asked}" in str(error.value)
        assert ("downloading it failed (<urlopen error [Errno -3]" in str(error.value)) == download
        assert not asked.exists()                                  # the download's empty folders removed
    monkeypatch.setattr(datasets.torchvision.datasets, "FashionMNIST", Downloads)
    assert datasets.fashion_mnist_root(str(asked), True) == str(asked)
    assert len(datasets.build_dataset("fashion-mnist", str(asked), True, None, download=False)) == 5
    fashion_files(debian, n=7)
    assert datasets.fashion_mnist_root(None, False) == str(debian)     # no --data-path: Debian's folder
    assert datasets.fashion_mnist_root(str(debian), False) == str(debian)
    assert len(datasets.build_dataset("fashion-mnist", None, False, None, download=False)) == 7
    # never called: the files are found first
    monkeypatch.setattr(datasets.torchvision.datasets, "FashionMNIST", urllib.error.URLError)
    assert datasets.fashion_mnist_root(str(asked), True) == str(asked)


def test_a_checkpoint_with_forbidden_objects_is_refused_unrun_with_the_right_words(tmp_path):
    """A torch file whose pickle calls os.system: the safe loader refuses it, nothing runs, and
    the line says what it is (not 'truncated')."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"model": Evil(), "optimizer": {}, "epoch": 1, "args": {}}, tmp_path / "evil.pth")
    res = run_cli("eval_linear.py", str(tmp_path / "evil.pth"), "--knn", "--output-dir", str(tmp_path / "o"))
    line = one_error_line(res)
    assert "it holds objects other than tensors and dicts, and was not loaded" in line, line
    assert not marker.exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------- a probe stopped by a signal ---
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_probe_stopped_by_a_signal_saves_inside_the_epoch_and_resumes(tmp_path, signum, status):
    """eval_linear.py as a preempted job: the step finishes, the checkpoint holds the epoch and
    step, one line says so, and the same command continues from there to the end."""
    ckpt, out = fake_checkpoint(tmp_path / "c.pth"), tmp_path / "ev"
    pre = torch.load(ckpt, weights_only=True)
    pre["args"]["fake_size"] = 2048                                      # 256 steps of 8 an epoch
    torch.save(pre, ckpt)
    cmd = [ckpt, *EVAL, "--epochs", "2", "--workers", "1",
           "--output-dir", str(out)]
    proc = subprocess.Popen([*script_command("eval_linear.py"), *cmd], cwd=ROOT, env=script_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + HANG
    while not (out / ".lock").exists() and time.time() < deadline:   # the data is read: training starts
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=HANG)
    assert proc.returncode == status and "Traceback" not in stderr, (proc.returncode, stderr[-3000:])
    assert "stopped at epoch 1, iteration" in stdout and "rerun the same command to resume" in stdout, stdout
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], 0 < saved["step_in_epoch"] < 256) == (0, True)
    res = run_cli("eval_linear.py", *cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["epoch"] for e in read_log(out / "log.txt")] == [1, 2]
    assert json.loads(res.stdout.strip().splitlines()[-1])["epochs"] == 2
