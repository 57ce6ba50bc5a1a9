"""train.py as a user runs it: command-line runs, resume, signals, data paths and faults.
Slower than test_snclr.py (real processes, whole epochs on tiny models); `pytest` runs them all."""
import json
import signal
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime import distributed
from runtime import options
from runtime import run_control
from runtime.checkpoint import ConfigError, read_log
from model import SNCLR
from conftest import (ROOT, SMOKE, TINY, _CountingFlatten, _knn_sets, copy_run, fails_in_process, jpeg_folder,
                      run_cli, snapshot)


# -------------------------------------------------------------------- model ---
@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(arch):
    from train import train_step
    torch.manual_seed(0)
    m = SNCLR(arch, **TINY, tau=0.2, num_neighbors=2, queue_size=256, positiveness="attention")
    m.queue.enqueue(torch.randn(16, 16))  # unrelated keys, so neighbors exist from step 1
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x1, x2 = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    losses = [train_step(m, m, x1, x2, opt, scaler, 0.99)[0].item() for _ in range(12)]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert len(m.queue) == 16 + 12 * 16


# ----------------------------------------------------------------- train.py ---
def test_cli_smoke_writes_log_and_checkpoint(smoke_run):
    lines = read_log(smoke_run / "log.txt")
    assert [e["epoch"] for e in lines] == [0, 1, 2]
    assert all(0 <= e["knn_top1"] <= 100 for e in lines)
    assert all(math.isfinite(e["loss"]) and e["images_per_s"] > 0 for e in lines[1:])
    ckpt = torch.load(smoke_run / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "resnet18"
    assert int(ckpt["model"]["queue.filled"]) == 32
    assert json.loads((smoke_run / "args.json").read_text())["num_neighbors"] == 2
    summary = f"random init {lines[0]['knn_top1']:.2f}% -> after 2 epochs {lines[-1]['knn_top1']:.2f}%"
    assert summary in (smoke_run / "stdout.txt").read_text()


def test_vit_with_adamw_and_frozen_patch_embedding_trains(tmp_path):
    import train
    vit = [a if a != "resnet18" else "vit_tiny" for a in SMOKE]
    vit[vit.index("sgd")] = "adamw"
    train.main(vit + ["--lr", "1e-3", "--epochs", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    # the frozen patch embedding keeps its initial value (train.py seeds with --seed 0 before building)
    torch.manual_seed(0)
    assert torch.equal(state["backbone.conv_proj.weight"], SNCLR("vit_tiny", **TINY).backbone.conv_proj.weight)
    # and the layers that do train move away from their momentum (EMA) copies
    assert not torch.equal(state["backbone.encoder.layers.encoder_layer_0.mlp.0.weight"],
                           state["momentum_backbone.encoder.layers.encoder_layer_0.mlp.0.weight"])


def test_resume_equals_straight_run(tmp_path):
    import train
    train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "a")])
    train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "b"),
                        "--stop-after-epoch", "1"])
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("signum, status, said", [(signal.SIGTERM, 143, "SIGTERM: stopped"),
                                                  (signal.SIGINT, 130, "Ctrl-C (SIGINT): stopped"),
                                                  (signal.SIGHUP, 129, "SIGHUP (the terminal closed): stopped")])
def test_a_signal_saves_mid_epoch_and_resumes(tmp_path, signum, status, said):
    """SIGTERM (cluster pre-emption), Ctrl-C and SIGHUP (an ssh session closed), sent to the whole
    process group as a terminal or torchrun does (DataLoader workers included): the step
    finishes, the checkpoint is saved, one line is printed, no traceback, and a rerun resumes."""
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *SMOKE, "--fake-size", "256", "--epochs", "20",
           "--knn-every", "0", "--workers", "1", "--print-freq", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "log.txt").exists() and time.time() < deadline:  # random-init kNN done
        time.sleep(0.2)
    time.sleep(1.5)
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == status and said in stdout and "Traceback" not in stderr, stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    steps_done = 16 * ckpt["epoch"] + ckpt["step_in_epoch"]   # 16 steps per epoch
    assert 0 < steps_done < 16 * 20 and int(ckpt["model"]["queue.filled"]) == min(16 * steps_done, 32)
    finish = ckpt["epoch"] + 1                                 # resume and end after that epoch
    res = run_cli("train.py", *SMOKE, "--fake-size", "256", "--epochs", "20", "--knn-every", "0",
                  "--output-dir", str(out), "--stop-after-epoch", str(finish))
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(out / "log.txt")
    assert [e["epoch"] for e in log if e["epoch"] == 0] == [0]    # no second "random init" line
    assert log[-1]["epoch"] == finish
    final = torch.load(out / "checkpoint.pth", weights_only=True)
    assert final["epoch"] == finish and final["step_in_epoch"] == 0
    assert final["knn_random_init"] == log[0]["knn_top1"]         # the baseline survives a resume


BAD_TRAIN_INPUT = [
    (["-K", "40"], "-K 40 must be in [0, --queue-size 32]"),
    (["--tau", "0"], "argument --tau: must be a finite number > 0.0, got 0"),
    (["--tau", "inf"], "argument --tau: must be a finite number > 0.0, got inf"),
    (["--batch-size", "0"], "argument --batch-size: must be a finite number > 0, got 0"),
    (["--batch-size", "-16"], "argument --batch-size: must be a finite number > 0, got -16"),
    (["--workers", "-1"], "argument --workers: must be a finite number >= 0, got -1"),
    (["--image-size", "0"], "argument --image-size: must be a finite number > 0, got 0"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0.0, got -1"),
    (["--stop-after-epoch", "-1"], "argument --stop-after-epoch: must be a finite number >= 0, got -1"),
    (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    (["--momentum", "1.5"], "--momentum (1.5) and --crop-min (0.2) must be at most 1"),
    (["--subset", "100000"], "--subset 100000 is larger than the data set (64 images)"),
    (["--knn-test-size", "999"], "--knn-test-size 999 is larger than the data set (16 images)"),
    (["--positiveness", "hard", "--positiveness-t", "0.5"], "--positiveness-t applies to --positiveness cosine"),
    (["--learn-gamma"], "--learn-gamma applies to --positiveness attention, not cosine"),
    (["--augment-device", "cuda"], "--augment-device cuda must be the training device (cpu); use "
                                   "--augment-device cpu or workers"),
    (["--batch-size", "1"], "--batch-size 1 gives 1 image per rank; batch norm needs at least 2"),
    (["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs 5 is longer than --epochs 2"),
    (["--dataset", "imagenet", "--data-path", "/nonexistent"], "/nonexistent/train"),
    (["--dataset", "fashion-mnist", "--data-path", "/nonexistent"], "dataset-fashion-mnist"),
    (["--image-size", "1"], "--image-size 1: image size 1 is too small for resnet18 with the small stem: "
                            "it needs at least 8 px"),
    (["--image-size", "7", "--stem", "imagenet"], "too small for resnet18 with the imagenet stem"),
    (["--arch", "vit_tiny", "--image-size", "4"], "too small for vit_tiny with the small stem: it needs at least 8"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN_INPUT)
def test_cli_bad_input_fails_with_one_line(tmp_path, capsys, extra, message):
    """Each bad value: one `error:` line, a non-zero exit, and no output folder (in-process: fast)."""
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.main(SMOKE + extra + ["--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code in (1, 2) and message in err, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_cli_bad_folders_fail_with_one_line(tmp_path, capsys):
    import train
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    cases = [(["--dataset", "folder", "--data-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")],
              "holds no images in class sub-folders"),
             (["--output-dir", str(tmp_path / "a_file")], "is a file, not a folder")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--output-dir", str(tmp_path / "o")], "no CUDA device is visible; "
                                                                                  "use --device cpu"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(SMOKE + argv)  # argparse: the last --device wins
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "o").exists() and (tmp_path / "a_file").read_text() == "keep me"


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    import train
    train.main(SMOKE + ["--epochs", "2", "--stop-after-epoch", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:   # resumes epoch 2 with an exploding learning rate
        train.main(SMOKE + ["--epochs", "2", "--knn-every", "0", "--lr", "1e30", "--allow-changed-args",
                            "--output-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and "error: loss is nan between step 4 and 7" in captured.err, captured.err
    assert "resumed with a changed option (--allow-changed-args): lr: 0.1 -> 1e+30" in captured.out
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_resume_with_changed_options_is_refused_or_logged(smoke_run, tmp_path, capsys):
    import train
    run = copy_run(smoke_run, tmp_path / "run")
    before = (run / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "3", "--lr", "0.2", "--tau", "0.5", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert "lr: 0.1 -> 0.2; tau: 1.0 -> 0.5" in err and "--allow-changed-args" in err, err
    assert err.count("\n") == 1 and (run / "checkpoint.pth").read_bytes() == before
    # options that only change output, monitoring or the length of the run resume freely
    train.main(SMOKE + ["--epochs", "3", "--stop-after-epoch", "2", "--workers", "1", "--knn-every", "0",
                        "--output-dir", str(run)])
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 2
    train.main(SMOKE + ["--epochs", "3", "--lr", "0.2", "--allow-changed-args", "--knn-every", "0",
                        "--output-dir", str(run)])
    out = capsys.readouterr().out
    assert "resumed with a changed option (--allow-changed-args): lr: 0.1 -> 0.2" in out
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert {"epoch": 3, "changed_args": ["lr: 0.1 -> 0.2"]} in log and log[-1]["epoch"] == 3  # from epoch 3 on
    merged = read_log(run / "log.txt")                    # one entry per epoch, lines merged
    assert [e["epoch"] for e in merged] == [0, 1, 2, 3] and {"loss", "changed_args"} <= set(merged[3])
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["runtime"] == {"device": "cpu", "augment": "workers"} and ckpt["world_size"] == 1
    ckpt["runtime"]["augment"] = "cuda"                   # as if written by a GPU run: noticed on resume
    torch.save(ckpt, run / "checkpoint.pth")
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "4", "--lr", "0.2", "--output-dir", str(run)])
    assert "augment: 'cuda' -> 'workers'" in capsys.readouterr().err


def test_mid_epoch_resume_with_another_batch_or_world_size_is_refused(smoke_run, tmp_path, capsys):
    import train
    run = copy_run(smoke_run, tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    ckpt.update(epoch=1, step_in_epoch=2)                  # as if SIGTERM stopped epoch 2 at step 2
    torch.save(ckpt, run / "checkpoint.pth")
    with pytest.raises(SystemExit):                        # even with --allow-changed-args
        train.main(SMOKE + ["--epochs", "2", "--batch-size", "8", "--allow-changed-args", "--output-dir", str(run)])
    assert "a mid-epoch resume needs the same batch size and number of processes" in capsys.readouterr().err
    ckpt["world_size"] = 2
    torch.save(ckpt, run / "checkpoint.pth")
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "2", "--output-dir", str(run)])
    assert "--batch-size 16 on 2 processes" in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_is_refused_and_a_dead_runs_lock_is_not(tmp_path, capsys):
    import signal
    import train
    from runtime.checkpoint import RunLock
    lock = RunLock(str(tmp_path))                          # a run in progress holds the folder
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--epochs", "1", "--output-dir", str(tmp_path)])
    assert f"{tmp_path} is in use by a running training (pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "log.txt").exists()
    lock.release()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
                               f"from runtime.checkpoint import RunLock; RunLock({str(tmp_path)!r}); "
                               f"print(1, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    holder.send_signal(signal.SIGKILL)                     # a crashed run: the OS releases its flock
    holder.wait()
    RunLock(str(tmp_path)).release()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_keeps_the_log_line_and_leaves_no_partial_file(tmp_path, capsys):
    import train
    from runtime.checkpoint import ConfigError, save_checkpoint
    (tmp_path / "checkpoint.pth.tmp").symlink_to("/dev/full")   # every write to the .tmp: ENOSPC
    with pytest.raises(ConfigError, match=f"no space left on {tmp_path}: saving checkpoint.pth needs about"):
        save_checkpoint(str(tmp_path / "checkpoint.pth"), {"x": torch.zeros(1000)})
    assert not os.path.lexists(tmp_path / "checkpoint.pth.tmp")
    (tmp_path / "checkpoint.pth.tmp").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as exit_info:
        train.main(SMOKE + ["--epochs", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "error: no space left on" in err and err.count("\n") == 1, err
    log = read_log(tmp_path / "log.txt")
    assert [e["epoch"] for e in log] == [0, 1] and "loss" in log[1]     # the epoch's figures are kept
    assert not os.path.lexists(tmp_path / "checkpoint.pth.tmp") and not (tmp_path / "checkpoint.pth").exists()


def test_unreadable_training_images_are_skipped_and_counted_or_named(tmp_path, capsys):
    import train
    data = jpeg_folder(tmp_path / "data")
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    common = [*SMOKE, "--dataset", "folder", "--data-path", str(data), "--batch-size", "4", "--queue-size", "8",
              "--epochs", "1", "--knn-every", "0"]
    train.main(common + ["--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert f"warning: skipping unreadable training image {data}/train/a/broken.jpg" in captured.err
    log = read_log(tmp_path / "run" / "log.txt")
    assert log[1]["skipped_images"] >= 1
    with pytest.raises(SystemExit):
        train.main(common + ["--strict-data", "--output-dir", str(tmp_path / "strict")])
    err = capsys.readouterr().err
    assert f"error: cannot read image {data}/train/a/broken.jpg" in err and err.count("\n") == 1, err
    (data / "train" / "a" / "broken.jpg").unlink()
    (data / "val" / "b" / "0.jpg").write_bytes(b"truncated")       # a test image: always an error
    with pytest.raises(SystemExit):
        train.main(common + ["--output-dir", str(tmp_path / "val")])
    assert f"error: cannot read image {data}/val/b/0.jpg" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the monitor's worker in /proc (Linux)")
def test_sigterm_to_the_process_group_during_the_monitor_exits_143(tmp_path):
    """As SLURM or torchrun send it: to every process, the monitor's DataLoader workers too
    (they ignore it; the main process stops the monitor, keeps the saved epoch, exits 143)."""
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *SMOKE, "--fake-size", "512", "--batch-size", "64",
           "--queue-size", "128", "--epochs", "3", "--workers", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    def workers_ignoring_sigterm():  # DataLoader workers that have run their worker_init_fn
        pids = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        try:
            masks = [next(line for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("SigIgn")) for pid in pids]
        except (OSError, StopIteration):
            return 0
        return sum(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1 for mask in masks)

    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "checkpoint.pth").exists()  # epoch 1 saved, and its monitor's
                                          and workers_ignoring_sigterm() >= 2):  # worker beside the training one
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "SIGTERM: stopped after epoch 1" in stdout, (stdout[-2000:], stderr[-2000:])
    log = read_log(out / "log.txt")
    assert log[-1]["epoch"] == 1 and log[-1].get("knn_interrupted") and "knn_top1" not in log[-1]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_truncated_idx_file_names_the_file(tmp_path):
    import gzip
    from images.datasets import DataError, read_idx
    with gzip.open(tmp_path / "x-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(5))
    assert read_idx(str(tmp_path / "x-idx1-ubyte.gz")).tolist() == [0] * 5
    whole = (tmp_path / "x-idx1-ubyte.gz").read_bytes()
    (tmp_path / "cut-idx1-ubyte.gz").write_bytes(whole[:-12])           # the gzip stream cut short
    with pytest.raises(DataError, match="cut-idx1-ubyte.gz"):
        read_idx(str(tmp_path / "cut-idx1-ubyte.gz"))
    with open(tmp_path / "short-idx1-ubyte", "wb") as f:                # the header promises more bytes
        f.write(bytes([0, 0, 8, 1]) + (9).to_bytes(4, "big") + bytes(5))
    with pytest.raises(DataError, match="short-idx1-ubyte holds 5 bytes of data but its header promises"):
        read_idx(str(tmp_path / "short-idx1-ubyte"))


def test_sigterm_during_the_knn_monitor_keeps_the_saved_epoch(tmp_path, monkeypatch, capsys):
    """The epoch's checkpoint is written before its monitor; a SIGTERM (the handler sets the stop
    event) arriving during the monitor stops it promptly and the run exits 143."""
    import train
    calls = []

    def monitor_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:                               # the monitor after epoch 1, not the random-init one
            assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
            kwargs["stop"].set()
        return knn_accuracy(*args, **kwargs)

    from monitors.knn import knn_accuracy
    monkeypatch.setattr(run_control, "knn_accuracy", monitor_then_sigterm)
    with pytest.raises(SystemExit) as exit_info:
        train.main(SMOKE + ["--epochs", "2", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 143 and "SIGTERM: stopped after epoch 1" in capsys.readouterr().out
    log = read_log(tmp_path / "log.txt")
    assert log[-1]["epoch"] == 1 and log[-1]["knn_interrupted"] and "knn_top1" not in log[-1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0


def test_resident_batches_follow_the_samplers_epoch_order():
    from images.datasets import EpochSampler
    from images.loaders import ResidentImages
    n, batch = 40, 4
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()
    sampler = EpochSampler(torch.utils.data.DistributedSampler(range(n), 2, 1, shuffle=True, seed=5, drop_last=True))
    sampler.set_epoch(3, skip=2 * batch)                     # a resumed epoch: two batches already done
    order = list(sampler)
    got = [(x[:, 0, 0, 0].tolist(), y.tolist()) for x, y in ResidentImages(images, torch.arange(n), sampler, batch)]
    assert [x for x, _ in got] == [y for _, y in got] == [order[i:i + batch] for i in range(0, 12, batch)]


def test_mid_epoch_resume_on_the_device_path_is_bit_exact(tmp_path, monkeypatch):
    """--augment-device cpu (the training set held on the device, images/augment.py): a run stopped
    inside epoch 1 and resumed ends with the same weights, queue and statistics as a straight run."""
    import train
    common = SMOKE + ["--epochs", "2", "--knn-every", "0", "--augment-device", "cpu"]
    train.main(common + ["--output-dir", str(tmp_path / "straight")])
    poll, polls = distributed.StopAgreement.poll, []

    def sigterm_during_step_2(self):                     # as if SIGTERM had arrived during step 2
        polls.append(1)
        return poll(self) or len(polls) == 2

    monkeypatch.setattr(distributed.StopAgreement, "poll", sigterm_during_step_2)
    with pytest.raises(SystemExit, match="143"):
        train.main(common + ["--output-dir", str(tmp_path / "resumed")])
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["step_in_epoch"] == 2
    monkeypatch.setattr(distributed.StopAgreement, "poll", poll)
    train.main(common + ["--output-dir", str(tmp_path / "resumed")])
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_a_resident_set_too_large_for_the_gpu_is_refused_with_the_option_to_use(monkeypatch):
    from images.datasets import DataError
    from images.loaders import check_fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**20, 80 * 2**30))  # 3 MiB free
    check_fits(torch.zeros(2**20, dtype=torch.uint8), torch.device("cuda", 0))           # 1 MiB: fits
    with pytest.raises(DataError, match="more than half of the 0.0 GiB free on cuda:0; use --augment-device workers"):
        check_fits(torch.zeros(2 * 2**20, dtype=torch.uint8), torch.device("cuda", 0))
    check_fits(torch.zeros(2 * 2**20, dtype=torch.uint8), torch.device("cpu"))           # host memory: no check


def test_pil_path_batches_do_not_depend_on_the_number_of_workers():
    from images.loaders import build_train_loader
    batches = []
    for workers in ("0", "2"):
        args = options.parse_args(SMOKE + ["--workers", workers])
        loader = build_train_loader(args, distributed.Env(0, 1, torch.device("cpu")), "workers")
        loader.set_epoch(1)
        batches.append(next(iter(loader)))
    ((a1, a2), ya), ((b1, b2), yb) = batches
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ya, yb) and not torch.equal(a1, a2)


def test_batch_must_divide_by_world_size():
    args = options.parse_args(SMOKE)
    cpu = torch.device("cpu")
    options.check_args(args, distributed.Env(0, 4, cpu))  # 16 = 4 x 4
    with pytest.raises(ConfigError, match="--batch-size 16 is not divisible by the world size 3"):
        options.check_args(args, distributed.Env(0, 3, cpu))


def test_cli_refuses_checkpoint_of_another_arch(smoke_run, capsys):
    import train
    before = (smoke_run / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--arch", "resnet34", "--epochs", "3", "--output-dir", str(smoke_run)])
    assert "arch: 'resnet18' -> 'resnet34'" in capsys.readouterr().err
    assert (smoke_run / "checkpoint.pth").read_bytes() == before


# --------------------------------------------------------------------- data ---
def test_fashion_mnist_reads_idx_gz_files(tmp_path):
    import gzip
    from images.datasets import FashionMNIST
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    for prefix in ("train", "t10k"):  # IDX: 0, 0, type 0x08 (ubyte), ndim, big-endian sizes, data
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (5, 28, 28))
                    + images.numpy().tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + labels.numpy().tobytes())
    ds = FashionMNIST(str(tmp_path), train=True)
    img, y = ds[2]
    assert len(ds) == 5 and y == 4 and img.size == (28, 28)
    assert torch.equal(torch.tensor(np.array(img)), images[2])


def test_epoch_sampler_skips_the_trained_part_of_the_same_order():
    from images.datasets import EpochSampler
    base = torch.utils.data.DistributedSampler(list(range(20)), num_replicas=2, rank=1, shuffle=True, seed=3)
    s = EpochSampler(base)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, skip=3)
    assert list(s) == full[3:] and len(s) == len(full) - 3
    s.set_epoch(5)
    assert list(s) != full and len(s) == len(full)  # a new epoch reshuffles, and skips nothing


def test_balanced_subset_takes_the_same_share_of_every_class():
    from images.subsets import balanced_subset
    labels = [0] * 300 + [1] * 100 + [2] * 50
    chosen = balanced_subset(labels, 10, seed=0)
    counts = [sum(labels[i] == c for i in chosen) for c in range(3)]
    assert counts == [30, 10, 5] and len(set(chosen)) == 45
    assert balanced_subset(labels, 10, seed=0) == chosen != balanced_subset(labels, 10, seed=1)
    assert [sum(labels[i] == c for i in balanced_subset(labels, 1, seed=0)) for c in range(3)] == [3, 1, 1]


# ------------------------------------------------------------------- monitors/knn.py ---
def test_knn_stop_returns_none_before_encoding_everything():
    import threading
    from monitors.knn import knn_accuracy
    train_set, test_set = _knn_sets()
    stop, net = threading.Event(), _CountingFlatten()
    stop.set()                                              # SIGTERM before the call
    assert knn_accuracy(net, train_set, test_set, 5, 4, 0, torch.device("cpu"), stop=stop) is None
    assert net.calls == 0
    stop.clear()
    net = _CountingFlatten(stop, set_at=3)                  # SIGTERM during the bank's 3rd batch
    assert knn_accuracy(net, train_set, test_set, 5, 4, 0, torch.device("cpu"), stop=stop) is None
    assert net.calls == 3                                   # one process checks every batch
    net = _CountingFlatten()
    stop.clear()
    assert 0 <= knn_accuracy(net, train_set, test_set, 5, 4, 0, torch.device("cpu"), stop=stop) <= 100
    assert net.calls == 10 + 6                              # 37 / 4 and 23 / 4 batches


# ---------------------------------------------------------------------- walkthrough.py ---
def test_walkthrough_runs_and_checks_every_quantity(capsys):
    """walkthrough.py asserts each quantity against its loop as it goes; run it in-process."""
    import runpy
    runpy.run_path(str(ROOT / "walkthrough.py"), run_name="__main__")
    out = capsys.readouterr().out
    labels = ["Eq. 3: NN(k2[b])", "Eq. 4: w1[0]", "Eq. 2: p_b(b*, i)", "Eq. 2 (code form)",
              "Eq. 2 (paper form)", "Eq. 1 (InfoNCE)", "Eq. 1 = Eq. 2 at K = 0"]
    at = [out.index(label) for label in labels]         # each printed, in the order of the step
    assert at == sorted(at), labels
    for quantity in ("w1[0, 2]", "p_0(0*, 3)", "symmetric loss", "queue holds 32 keys"):
        assert quantity in out, quantity


# ------------------------------------------------------------- run folders: nothing mixed ---
def test_resume_into_a_folder_holding_another_run_is_refused(smoke_run, tmp_path, capsys):
    import train
    copy_run(smoke_run, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.txt").write_text('{"epoch": 0, "knn_top1": 1.0}\n')
    before = snapshot(tmp_path)
    err = fails_in_process(capsys, train.main, SMOKE + ["--epochs", "3", "--resume",
                                                        str(tmp_path / "a" / "checkpoint.pth"),
                                                        "--output-dir", str(tmp_path / "b")], status=1)
    assert "would write into" in err and "holds another run's files" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["no checkpoint", "checkpoint is a folder", "dangling link", "log is a folder"])
def test_a_folder_that_would_mix_two_runs_is_refused(tmp_path, capsys, damage):
    """A log.txt without a readable checkpoint.pth beside it would be appended to by a fresh run."""
    import train
    out = tmp_path / "run"
    out.mkdir()
    if damage == "log is a folder":
        (out / "log.txt").mkdir()
    else:
        (out / "log.txt").write_text('{"epoch": 0, "knn_top1": 1.0}\n{"epoch": 1, "loss": 9.0}\n')
    if damage == "checkpoint is a folder":
        (out / "checkpoint.pth").mkdir()
    elif damage == "dangling link":
        (out / "checkpoint.pth").symlink_to(tmp_path / "gone.pth")
    before = snapshot(tmp_path)
    err = fails_in_process(capsys, train.main, SMOKE + ["--epochs", "1", "--output-dir", str(out)], status=1)
    expected = {"no checkpoint": "holds a log.txt of trained epochs but no checkpoint.pth",
                "log is a folder": "log.txt is not a file",
                "checkpoint is a folder": "is not a checkpoint file", "dangling link": "is not a checkpoint file"}
    assert expected[damage] in err and snapshot(tmp_path) == before


def test_a_first_attempt_that_ended_before_its_first_save_is_started_over(tmp_path):
    """A log.txt that holds only a random-init line (a run that failed in its first epoch) is
    replaced by the new run's, not continued: one epoch-0 line."""
    import train
    (tmp_path / "log.txt").write_text('{"epoch": 0, "knn_top1": 1.0}\n')
    train.main(SMOKE + ["--epochs", "1", "--output-dir", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [0, 1, 1] and lines[0]["knn_top1"] != 1.0


def test_rerunning_a_resume_command_continues_from_its_own_folder(smoke_run, tmp_path):
    """`--resume A/checkpoint.pth --output-dir B`, stopped and rerun: B's own, newer checkpoint
    is continued (the rerun is not refused as another run's folder, nor restarted from A)."""
    import train
    a = copy_run(smoke_run, tmp_path / "a")                            # 2 epochs done
    command = SMOKE + ["--epochs", "4", "--knn-every", "0", "--resume", str(a / "checkpoint.pth"),
                       "--output-dir", str(tmp_path / "b")]
    train.main(command + ["--stop-after-epoch", "3"])
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 3
    train.main(command)
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["epoch"] == 4
    assert [e["epoch"] for e in read_log(tmp_path / "b" / "log.txt")] == [3, 4]


def test_mid_epoch_resume_on_a_data_set_of_another_size_is_refused(smoke_run, tmp_path, capsys):
    import train
    run = copy_run(smoke_run, tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["train_images"] == 64
    ckpt.update(epoch=1, step_in_epoch=2)                 # as if stopped inside epoch 2
    torch.save(ckpt, run / "checkpoint.pth")
    before = snapshot(tmp_path)
    err = fails_in_process(capsys, train.main, SMOKE + ["--epochs", "2", "--fake-size", "80", "--allow-changed-args",
                                                        "--output-dir", str(run)], status=1)
    assert "stopped inside epoch 2 of a data set of 64 training images" in err and "holds 80" in err
    assert snapshot(tmp_path) == before


def test_the_epochs_log_line_is_on_disk_with_its_checkpoint_before_the_monitor(tmp_path, monkeypatch):
    """A process killed during the kNN monitor keeps the finished epoch's line (loss, speed,
    neighbor figures); the monitor's figure follows in a line of its own."""
    import train
    from monitors.knn import knn_accuracy
    seen = []

    def monitor(*args, **kwargs):
        if (tmp_path / "checkpoint.pth").exists():        # not the random-init monitor
            seen.append((read_log(tmp_path / "log.txt")[-1],
                         torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"]))
        return knn_accuracy(*args, **kwargs)

    monkeypatch.setattr(run_control, "knn_accuracy", monitor)
    train.main(SMOKE + ["--epochs", "1", "--output-dir", str(tmp_path)])
    (line, epoch), = seen
    assert epoch == 1 and line["epoch"] == 1 and "loss" in line and "knn_top1" not in line
    assert "knn_top1" in read_log(tmp_path / "log.txt")[-1]


# ------------------------------------------------------------- what the loop feeds the step ---
def test_the_loop_moves_both_schedules_every_step(tmp_path, monkeypatch):
    """train_one_epoch hands each step the momentum and lr of *that* step: m(t) and lr(t) at
    t = epoch * steps + it, not values frozen per epoch."""
    import train
    from model import momentum_schedule
    seen, real = [], train.train_step

    def recording(model, ddp_model, x1, x2, optimizer, scaler, m, *rest):
        seen.append((m, optimizer.param_groups[0]["lr"]))
        return real(model, ddp_model, x1, x2, optimizer, scaler, m, *rest)
    monkeypatch.setattr(train, "train_step", recording)
    train.main(SMOKE + ["--epochs", "2", "--lr", "0.4", "--warmup-epochs", "1", "--momentum", "0.9",
                        "--knn-every", "0", "--output-dir", str(tmp_path)])
    args = options.parse_args(SMOKE + ["--epochs", "2", "--lr", "0.4", "--warmup-epochs", "1"])
    steps = 4                                                       # 64 fake images, batch 16
    assert len(seen) == 2 * steps
    for t, (m, lr) in enumerate(seen):
        assert m == pytest.approx(momentum_schedule(t, 2 * steps, 0.9), abs=1e-12)
        assert lr == pytest.approx(train.learning_rate(t, steps, args), abs=1e-12)
    ms = [m for m, _ in seen]
    assert all(a < b for a, b in zip(ms, ms[1:]))                   # rises within each epoch too


def test_knn_options_reach_the_monitors_vote(tmp_path, monkeypatch):
    """--knn-k and --knn-t as train.py's monitor passes them to the vote (the vote's own use of
    t is checked against the formula in test_distributed.py)."""
    import train
    from monitors import knn
    seen, real = [], knn.knn_accuracy

    def recording(*a, **kw):
        seen.append((a[-2:], kw.get("stop") is not None))
        return real(*a, **kw)
    monkeypatch.setattr(run_control, "knn_accuracy", recording)
    train.main(SMOKE + ["--epochs", "1", "--knn-k", "3", "--knn-t", "0.5", "--output-dir", str(tmp_path)])
    assert seen and all(last == (3, 0.5) and stop for last, stop in seen)


def test_a_checkpoint_whose_queue_has_no_labels_is_refused_by_name(tmp_path, capsys):
    """A queue without its labels (a checkpoint of an early version) is not read as class 0 or
    any other class: the strict load names the missing key, and nothing is written."""
    import train
    train.main(SMOKE + ["--epochs", "1", "--knn-every", "0", "--output-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    del ckpt["model"]["queue.labels"]
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    before = snapshot(tmp_path)
    line = fails_in_process(capsys, train.main, SMOKE + ["--epochs", "2", "--output-dir", str(tmp_path)])
    assert 'does not fit: Missing key(s) in state_dict: "queue.labels"' in line, line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------- faults of the third round ---
def start_run(out, *extra, workers="0"):
    """train.py as a real process in its own process group (as a terminal starts it), printing a
    plain line per step on stdout; (process, the lines it printed so far)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *SMOKE, "--knn-every", "0", "--print-freq", "1",
           "--workers", workers, "--output-dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(proc, epoch: int, timeout: float = 300.0) -> None:
    """Read the run's stdout until it has printed a step line of `epoch` (1-based)."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, f"the run ended before epoch {epoch}: {proc.stderr.read()[-3000:]}"
        if line.startswith(f"epoch {epoch}/"):
            return
    raise AssertionError(f"no step of epoch {epoch} within {timeout} s")


def test_a_second_signal_stops_at_once_without_claiming_a_save(tmp_path):
    """The first signal asks for a save; a second, before that step is done, stops at once:
    status 1 (not 143, which says 'saved'), one line saying nothing was saved and what is kept,
    and the checkpoint of the last epoch intact. Both arrive while the process is stopped, so
    they are handled together, in signal-number order: Ctrl-C (2) first, then SIGTERM (15)."""
    out = tmp_path / "run"
    assert run_cli("train.py", *SMOKE, "--fake-size", "256", "--epochs", "1", "--knn-every", "0",
                   "--output-dir", str(out)).returncode == 0
    before = torch.load(out / "checkpoint.pth", weights_only=True)
    proc = start_run(out, "--fake-size", "256", "--epochs", "3")
    wait_for_step(proc, 2)
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, stderr[-3000:])
    assert lines[0] == (f"error: a second SIGTERM: stopped at once, without saving; the last checkpoint, "
                        f"{out}/checkpoint.pth, is kept")
    after = torch.load(out / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == before["epoch"] == 1 and after["step_in_epoch"] == 0


def test_a_data_worker_killed_ends_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """kill -9 of a DataLoader worker (what the kernel's OOM killer does): one `error:` line that
    names the worker's death and the likely cause, the checkpoint of the last epoch kept, exit 1."""
    out = tmp_path / "run"
    more = ["--fake-size", "512"]
    assert run_cli("train.py", *SMOKE, *more, "--epochs", "1", "--knn-every", "0", "--workers", "2",
                   "--output-dir", str(out)).returncode == 0
    before = (out / "checkpoint.pth").read_bytes()
    proc = start_run(out, *more, "--epochs", "3", workers="2")
    wait_for_step(proc, 2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, stderr[-3000:])
    assert lines[0].startswith("error: a DataLoader worker died (killed by signal: Killed), most likely the machine "
                               "ran out of memory"), lines[0]
    assert lines[0].endswith(f"lower --workers or --batch-size; the last checkpoint, {out}/checkpoint.pth, is kept")
    assert (out / "checkpoint.pth").read_bytes() == before


def test_a_finished_run_rerun_with_fewer_epochs_changes_no_file(smoke_run, tmp_path, capsys):
    """Nothing to train: the run's files (args.json included) stay as the run left them."""
    import train
    run = copy_run(smoke_run, tmp_path / "run")
    before = snapshot(run)
    train.main(SMOKE + ["--epochs", "1", "--workers", "1", "--print-freq", "5", "--output-dir", str(run)])
    assert "nothing to train" in capsys.readouterr().out
    assert snapshot(run) == before


def test_an_append_after_a_cut_line_starts_a_new_line_and_readers_skip_the_fragment(tmp_path, capsys):
    """log.txt's last line cut short (a kill or a full disk mid-write), then the run continued:
    the next record starts on a line of its own, the reader skips and counts the fragment, and
    the curves are drawn."""
    import train
    from tools import visualize
    out = tmp_path / "run"
    train.main(SMOKE + ["--epochs", "1", "--output-dir", str(out)])
    log = out / "log.txt"
    text = log.read_bytes()
    log.write_bytes(text[:-12])                                        # the epoch's kNN line, cut
    train.main(SMOKE + ["--epochs", "2", "--output-dir", str(out)])
    lines = log.read_text().splitlines()
    assert sum(1 for line in lines if not line.endswith("}")) == 1     # the fragment alone, on its own line
    entries = read_log(log)
    assert [e["epoch"] for e in entries] == [0, 1, 2] and entries.broken == 1
    assert "knn_top1" in entries[2] and "loss" in entries[1]
    capsys.readouterr()
    visualize.main(["curves", str(log), "--out", str(tmp_path / "curves.png")])
    assert "1 broken line(s) skipped" in capsys.readouterr().out and (tmp_path / "curves.png").is_file()


def test_the_same_signal_twice_at_once_is_one_request_and_saves(tmp_path):
    """SLURM signals every process of a job step and torchrun passes the signal on: a rank
    gets SIGTERM twice within milliseconds. That is one request: the step finishes, the run
    saves and exits 143."""
    import time
    out = tmp_path / "run"
    proc = start_run(out, "--fake-size", "256", "--epochs", "3")
    wait_for_step(proc, 1)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "SIGTERM: stopped at epoch 1" in stdout, (proc.returncode, stderr[-3000:])
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step_in_epoch"] > 0
