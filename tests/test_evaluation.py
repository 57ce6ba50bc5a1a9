"""eval_linear.py, tools/visualize.py, tools/bench.py and tools/ablations.py on tiny checkpoints and data."""
import json
import math
import pathlib
import shlex

import pytest
import torch

from runtime import distributed
from model import build_backbone
from conftest import ROOT, run_cli, fails_in_process, fake_checkpoint


# ----------------------------------------------------------- eval_linear.py ---
def test_eval_linear_and_knn_on_smoke_checkpoint(smoke_run, tmp_path):
    import eval_linear
    ckpt = str(smoke_run / "checkpoint.pth")
    common = ["--batch-size", "32", "--workers", "0", "--device", "cpu"]
    probe = eval_linear.main([ckpt, "--epochs", "2", "--output-dir", str(tmp_path / "lin"), *common])
    knn = eval_linear.main([ckpt, "--knn", "--output-dir", str(tmp_path / "knn"), *common])
    rand = eval_linear.main([ckpt, "--knn", "--random-init", "--output-dir", str(tmp_path / "rnd"), *common])
    for r in (probe, knn, rand):
        assert math.isfinite(r["top1"]) and 0 <= r["top1"] <= 100
    assert 0 <= probe["top1"] <= probe["top5"] <= 100
    assert (tmp_path / "lin" / "best.pth").exists() and (tmp_path / "lin" / "checkpoint.pth").exists()
    saved = json.loads((tmp_path / "knn" / "results.txt").read_text().splitlines()[-1])
    assert saved["top1"] == knn["top1"] and saved["mode"] == "knn"
    # the checkpoint's --fake-size 64 (16 test images), not build_dataset's default 512
    assert (probe["train_images"], probe["test_images"]) == (64, 16)


def test_eval_knn_equals_the_monitor_of_the_last_epoch(smoke_run, tmp_path):
    import eval_linear
    logged = json.loads((smoke_run / "log.txt").read_text().splitlines()[-1])
    result = eval_linear.main([str(smoke_run / "checkpoint.pth"), "--knn", "--workers", "0", "--device", "cpu",
                               "--output-dir", str(tmp_path)])
    assert result["top1"] == logged["knn_top1"] and logged["epoch"] == result["pretrain_epoch"] == 2


def test_probe_separates_a_separable_set_and_keeps_backbone_frozen(tmp_path):
    import eval_linear
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    centers = 3 * torch.randn(4, 3, 2, 2, generator=g)
    x = centers[y] + 0.3 * torch.randn(200, 3, 2, 2, generator=g)       # 4 well-separated blobs
    data = torch.utils.data.TensorDataset(x, y)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16))
    args = eval_linear.get_args_parser().parse_args(["unused", "--epochs", "20", "--batch-size", "32",
                                                     "--workers", "0"])
    env = distributed.Env(0, 1, torch.device("cpu"))
    top1, top5, best = eval_linear.train_classifier(backbone, 16, 4, data, data, args, env, 0.5, False, str(tmp_path))
    assert top1 > 95 and best >= top1 and top5 == 100


def test_backbone_unchanged_check_fails_when_modified():
    import eval_linear
    net, _ = build_backbone("resnet18", 16)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    eval_linear.check_backbone_unchanged(net, reference)
    net.bn1.running_mean += 1e-3
    with pytest.raises(RuntimeError, match="bn1.running_mean"):
        eval_linear.check_backbone_unchanged(net, reference)


@pytest.mark.parametrize("arch, size, stem, make", [
    ("resnet18", 32, "imagenet", lambda: __import__("torchvision").models.resnet18()),
    ("vit_tiny", 32, "imagenet", lambda: __import__("torchvision").models.VisionTransformer(32, 16, 12, 3, 192, 768)),
    ("vit_tiny", 16, "small", lambda: __import__("torchvision").models.VisionTransformer(16, 4, 12, 3, 192, 768)),
])
def test_export_loads_into_torchvision(tmp_path, arch, size, stem, make):
    import eval_linear
    ckpt = fake_checkpoint(tmp_path / "c.pth", arch, size, stem)
    eval_linear.main([ckpt, "--export", str(tmp_path / "e.pth")])
    state = torch.load(tmp_path / "e.pth", weights_only=True)
    res = make().load_state_dict(state, strict=False)
    assert not res.unexpected_keys
    assert sorted(res.missing_keys) == (["fc.bias", "fc.weight"] if arch.startswith("resnet")
                                        else ["heads.head.bias", "heads.head.weight"])


def test_export_of_small_stem_loads_after_the_same_stem_change(smoke_run, tmp_path):
    import torchvision
    import eval_linear
    eval_linear.main([str(smoke_run / "checkpoint.pth"), "--export", str(tmp_path / "e.pth")])
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    res = net.load_state_dict(torch.load(tmp_path / "e.pth", weights_only=True), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys


def test_eval_export_never_overwrites_its_checkpoint_and_needs_force(tmp_path, capsys):
    import eval_linear
    ckpt = fake_checkpoint(tmp_path / "c.pth", "resnet18", 16, "small")
    before = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "link.pth").symlink_to(tmp_path / "c.pth")
    for target in ("c.pth", "link.pth", "./sub/../c.pth"):
        for force in ([], ["--force"]):
            err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / target), *force])
            assert "is the checkpoint being exported" in err
    assert (tmp_path / "c.pth").read_bytes() == before
    (tmp_path / "e.pth").write_bytes(b"keep me")
    err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / "e.pth")])
    assert "exists; add --force to replace it" in err and (tmp_path / "e.pth").read_bytes() == b"keep me"
    eval_linear.main([ckpt, "--export", str(tmp_path / "e.pth"), "--force"])
    assert "conv1.weight" in torch.load(tmp_path / "e.pth", weights_only=True)
    (tmp_path / "folder").mkdir()
    err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / "none" / "e.pth")])
    assert "does not exist" in err and not (tmp_path / "none").exists()
    err = fails_in_process(capsys, eval_linear.main, [ckpt, "--export", str(tmp_path / "folder"), "--force"])
    assert "is a folder" in err and not any((tmp_path / "folder").iterdir())
    assert not list(tmp_path.rglob("*.tmp")) and (tmp_path / "c.pth").read_bytes() == before


def test_eval_bad_input(smoke_run, tmp_path, capsys):
    import eval_linear
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    (tmp_path / "list.txt").write_text("n01440764_10026.JPEG\n")
    (tmp_path / "a_file").write_text("")
    ckpt = str(smoke_run / "checkpoint.pth")
    usage = [(["--batch-size", "0"], "argument --batch-size: must be a finite number > 0, got 0"),
             (["--batch-size", "-8"], "argument --batch-size: must be a finite number > 0, got -8"),
             (["--epochs", "0"], "argument --epochs: must be a finite number > 0, got 0"),
             (["--workers", "-1"], "argument --workers: must be a finite number >= 0, got -1"),
             (["--lr", "-1"], "argument --lr: must be a finite number > 0.0, got -1"),
             (["--lr", "inf"], "argument --lr: must be a finite number > 0.0, got inf"),
             (["--knn", "--knn-k", "0"], "argument --knn-k: must be a finite number > 0, got 0"),
             (["--knn", "--knn-t", "0"], "argument --knn-t: must be a finite number > 0.0, got 0"),
             (["--train-percent", "5"], "must be 1 or 10"),
             (["--dataset", "mnist"], "invalid choice: 'mnist'")]
    for argv, message in usage:
        assert message in fails_in_process(capsys, eval_linear.main, [ckpt, *argv], status=2), argv
    out = str(tmp_path / "o")
    cases = [([str(tmp_path / "corrupt.pth")], "cannot read checkpoint"),
             ([str(tmp_path / "other.pth")], "is not a checkpoint of this project"),
             ([str(smoke_run)], f"checkpoint {smoke_run} is a directory"),
             ([ckpt, "--arch", "vit_small"], "arch='resnet18' but arch='vit_small'"),
             ([ckpt, "--train-percent", "1", "--knn"], "--knn and --train-percent are different evaluations"),
             ([ckpt, "--cache-features", "--export", str(tmp_path / "e.pth")], "are different evaluations"),
             ([ckpt, "--knn-k", "5"], "--knn-k applies to --knn only"),
             ([ckpt, "--force"], "--force applies to --export only"),
             ([ckpt, "--subset-list", str(tmp_path / "list.txt")], "--subset-list applies to --train-percent"),
             ([ckpt, "--train-percent", "1", "--subset-list", str(tmp_path / "none.txt")], "none.txt: no such file"),
             ([ckpt, "--train-percent", "1", "--subset-list", str(tmp_path / "list.txt")],
              "--subset-list needs an image-folder dataset"),
             ([ckpt, "--knn", "--knn-train-size", "65"], "--knn-train-size 65 is larger than the data set (64")]
    for argv, message in cases:
        assert message in fails_in_process(capsys, eval_linear.main, [*argv, "--workers", "0", "--output-dir", out])
        assert not (tmp_path / "o").exists(), argv
    for folder, message in [(tmp_path / "a_file", "is a file, not a folder"),
                            (tmp_path / "a_file" / "sub", "a_file is a file"),
                            (smoke_run, "holds a train.py run")]:
        err = fails_in_process(capsys, eval_linear.main, [ckpt, "--knn", "--output-dir", str(folder)])
        assert message in err, err
    assert (tmp_path / "a_file").read_text() == "" and not (smoke_run / "results.txt").exists()
    # a real process: torch's advice about weights_only=False (unsafe) and its warnings stay out
    res = run_cli("eval_linear.py", str(tmp_path / "corrupt.pth"), "--output-dir", out)
    assert res.returncode == 1 and res.stderr.startswith("error: cannot read checkpoint"), res.stderr
    assert res.stderr.strip().count("\n") == 0 and "weights_only" not in res.stderr, res.stderr


def test_eval_errors_are_printed_by_rank_0_only(smoke_run, monkeypatch, capsys):
    import eval_linear
    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    for argv, status in [(["--batch-size", "0"], 2), (["--arch", "vit_small"], 1)]:
        with pytest.raises(SystemExit) as exit_:
            eval_linear.main([str(smoke_run / "checkpoint.pth"), *argv, "--device", "cpu"])
        assert exit_.value.code == status and capsys.readouterr().err == ""


def test_eval_data_path_of_an_older_checkpoint(tmp_path):
    import eval_linear
    from runtime.checkpoint import ConfigError
    ckpt = str(tmp_path / "runs" / "checkpoint.pth")
    old = {"dataset": "cifar10", "data_path": "data"}
    with pytest.raises(ConfigError, match="relative data path 'data'.*give --data-path"):
        eval_linear.checkpoint_data_path(ckpt, old)
    (tmp_path / "data").mkdir()  # train.py ran in tmp_path with --output-dir runs
    assert eval_linear.checkpoint_data_path(ckpt, old) == str(tmp_path / "data")
    assert eval_linear.checkpoint_data_path(ckpt, old, "/given") == "/given"
    assert eval_linear.checkpoint_data_path(ckpt, {"dataset": "cifar10", "data_path": "/abs"}) == "/abs"


# ------------------------------------------------------------- tools/visualize.py ---
def test_visualize_calibration_on_smoke_checkpoint(smoke_run, tmp_path, capsys):
    from PIL import Image
    from tools import visualize
    out = tmp_path / "calibration.png"
    visualize.main(["calibration", str(smoke_run / "checkpoint.pth"), "--out", str(out), "--workers", "0"])
    line = capsys.readouterr().out
    assert "K=2, 16 queries x 2 neighbors in a bank of 64" in line and "AUROC " in line, line
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (760, 460)


def test_visualize_calibration_figures():
    from tools import visualize
    from monitors.neighbor_quality import auroc
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.3]])
    same = torch.tensor([[True, False, False], [True, True, False]])
    f = visualize.calibration_figures(w, same)
    assert (f["same"], f["other"]) == (3, 3)
    assert f["w_same"] == pytest.approx(1.4 / 3) and f["w_other"] == pytest.approx(0.8 / 3)
    # same {0.5, 0.6, 0.3} beats other {0.3, 0.2, 0.3} in 3 + 3 + (0.5 + 1 + 0.5) of 9 pairs (a tie counts 1/2)
    assert f["auroc"] == auroc(w.flatten(), same.flatten()) == pytest.approx(8 / 9)
    assert visualize.calibration_figures(w, torch.ones_like(same))["auroc"] is None


def test_visualize_neighbors_and_curves_on_smoke_run(smoke_run, tmp_path, capsys):
    from PIL import Image
    from tools import visualize
    visualize.main(["neighbors", str(smoke_run / "checkpoint.pth"), "--out", str(tmp_path / "n.png"),
                    "--queries", "3", "--workers", "0"])
    assert "3 queries x 2 neighbors" in capsys.readouterr().out
    visualize.main(["curves", str(smoke_run / "log.txt"), "--out", str(tmp_path / "c.png")])
    with Image.open(tmp_path / "c.png") as img:  # the smoke log has nn_agree / w_agree: a third panel
        assert img.format == "PNG" and img.size == (1360, 350)


def test_visualize_bad_input_fails_with_one_line(smoke_run, tmp_path, capsys):
    from tools import visualize
    ckpt, out = str(smoke_run / "checkpoint.pth"), str(tmp_path / "p.png")
    (tmp_path / "empty.txt").write_text("")
    cases = [(["calibration", str(tmp_path / "none.pth"), "--out", out], 1, "none.pth: no such file"),
             (["calibration", str(smoke_run), "--out", out], 1, "is a directory"),
             (["calibration", ckpt, "--queries", "0"], 2, "argument --queries: must be a finite number > 0"),
             (["neighbors", ckpt, "-K", "0"], 2, "argument -K: must be a finite number > 0"),
             (["calibration", ckpt, "--bank-size", "-1"], 2, "argument --bank-size: must be a finite number >= 0"),
             (["calibration", ckpt, "--queries", "17", "--workers", "0", "--out", out], 1,
              "--queries 17 is more than the 16 test images"),
             (["calibration", ckpt, "-K", "65", "--workers", "0", "--out", out], 1, "-K 65 is more than the 64"),
             (["calibration", ckpt, "--out", str(tmp_path / "none" / "p.png")], 1, "does not exist"),
             (["calibration", ckpt, "--out", str(tmp_path / "p.txt")], 1, "Pillow cannot write a .txt file"),
             (["curves", str(tmp_path / "log.txt"), "--out", out], 1, "log.txt: no such file"),
             (["curves", str(tmp_path / "empty.txt"), "--out", out], 1, "has no training epochs yet"),
             (["curves", ckpt, "--out", out], 1, "is not a train.py log.txt"),
             (["curves"], 2, "the following arguments are required: log")]
    for argv, status, message in cases:
        assert message in fails_in_process(capsys, visualize.main, argv, status), argv
    assert not list(tmp_path.glob("p.*"))


# ----------------------------------------------------------------- tools/bench.py ---
BENCH_TINY = ["--device", "cpu", "--arch", "resnet18", "--image-size", "16", "--batch-size", "8", "--queue-size", "32",
              "-K", "2", "--dim", "16", "--mlp-dim", "32", "--repeats", "1"]


def test_bench_data_tiny_prints_json_last(tmp_path):
    res = run_cli("tools/bench.py", "--data", *BENCH_TINY, "--data-images", "4", "--data-steps", "2",
                  "--data-workers", "0", "--loader-images", "4", "--warmup", "0", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("loader_pairs_per_s_per_worker", "loader_pairs_per_s_per_worker_pil", "augment_ms_per_batch_224",
                "augment_ms_per_batch_32", "end_to_end_images_per_s", "step_only_images_per_s"):
        assert math.isfinite(last[key]) and last[key] > 0, key
    assert last["device"].startswith("cpu") and last["torch"] == torch.__version__
    assert json.loads((tmp_path / "bench_data_cpu.json").read_text())["end_to_end_images_per_s"] == \
        last["end_to_end_images_per_s"]


def test_bench_step_channels_last_writes_its_own_file(tmp_path):
    res = run_cli("tools/bench.py", *BENCH_TINY, "--scaling-queues", "32", "--scaling-k", "2", "--channels-last",
                  "--warmup", "0", "--out", str(tmp_path))                # no warm-up is a fair request
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bench_cpu_resnet18_channels_last.json").read_text())
    assert result["images_per_s"]["snclr"] > 0 and result["args"]["channels_last"]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "argument --batch-size: must be a finite number > 0, got 0"),
    (["--repeats", "0"], "argument --repeats: must be a finite number > 0, got 0"),
    (["--data", "--data-steps", "0"], "argument --data-steps: must be a finite number > 0, got 0"),
    (["--arch", "vit_tiny", "--channels-last"], "--channels-last applies to ResNets"),
])
def test_bench_bad_input_fails_with_one_line(tmp_path, capsys, extra, message):
    from tools import bench
    with pytest.raises(SystemExit) as exit_:
        bench.main([*extra, "--out", str(tmp_path / "out")])
    assert exit_.value.code != 0
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.strip().count("\n") == 0, err
    assert out == "" and not (tmp_path / "out").exists()


def test_bench_default_out_is_not_the_committed_results():
    from tools import bench
    parser = bench.get_args_parser()
    out = pathlib.Path(parser.parse_args([]).out)
    assert out.parts[0] == "runs" and "results" not in out.parts   # runs/ is in .gitignore
    assert "--out results" in " ".join(parser.format_help().split())


# ------------------------------------------------------------- tools/ablations.py ---
def test_ablation_results_of_other_settings_are_refused_not_reused(tmp_path):
    from tools import ablations
    args = ablations.get_args_parser().parse_args(["--results", str(tmp_path), "--runs", str(tmp_path / "runs")])
    row = {"variant": "cosine", "seed": 0, "command": shlex.join(ablations.train_command("cosine", 0, args))}
    (tmp_path / "ablation_cosine_s0.json").write_text(json.dumps(row))
    assert ablations.result("cosine", 0, args) == row                      # the same settings: reused
    gpu = ablations.get_args_parser().parse_args(["--results", str(tmp_path), "--epochs", "100", "--device", "cuda"])
    with pytest.raises(SystemExit, match="holds a run of other settings"):
        ablations.result("cosine", 0, gpu)


# ------------------------------------------------------------------ tools/bench_gpu.sh ---
def test_bench_gpu_smoke_runs_every_part_however_slow_the_machine(tmp_path):
    """DEVICE=cpu SMOKE=1 checks that each part runs: with a budget of one second nothing may be
    cut, timed out or failed (a busy machine is slow, not broken), and the table is printed."""
    import os
    import subprocess
    env = {**os.environ, "DEVICE": "cpu", "SMOKE": "1", "BUDGET_S": "1", "OUT": str(tmp_path / "bench")}
    res = subprocess.run(["bash", str(ROOT / "tools" / "bench_gpu.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "0 check(s) failed, 0 part(s) timed out or cut by the budget" in res.stdout
    assert "skipped, the" not in res.stdout and "timed out" not in res.stdout.replace("timed out or cut", "")
    assert "| SNCLR step, img/s" in res.stdout and (tmp_path / "bench" / "bench_gpu.log").is_file()
