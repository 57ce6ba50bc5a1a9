"""tools/slurm.sbatch on a real SLURM: a single-node cluster started by the test on this machine
(tests/slurm_cluster.sh: munged, slurmctld and slurmd on localhost, as root), a tiny run on two
CPU ranks (gloo) preempted mid-run, requeued by the script itself, and resumed to the same
weights as a run never interrupted. .ci/run installs Debian's slurm-wlm and munge; elsewhere,
without them or without root, the test is skipped and says why."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from runtime.checkpoint import read_log
from conftest import ROOT, free_port

NEEDED = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol")
missing = [tool for tool in NEEDED if shutil.which(tool) is None]
needs_slurm = pytest.mark.skipif(bool(missing) or os.geteuid() != 0, reason=(
    f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)" if missing
    else "starting SLURM's daemons needs root"))

RUN = ["--dataset", "fake", "--arch", "resnet18", "--image-size", "16", "--fake-size", "256",
       "--batch-size", "16", "--queue-size", "32", "-K", "2", "--dim", "16", "--mlp-dim", "32",
       "--workers", "0", "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0", "--device", "cpu",
       "--augment-device", "cpu", "--epochs", "3", "--knn-every", "0"]


@pytest.fixture
def cluster(tmp_path):
    """A running single-node SLURM whose state (and the job's run folder) lives in tmp_path/c."""
    folder = tmp_path / "c"
    start = subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "start", str(folder)],
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    try:
        yield folder, env
    finally:
        subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "stop", str(folder)],
                       capture_output=True, timeout=120)


def job_state(job: str, env) -> dict:
    """scontrol's fields of the job (JobState, Restarts, ...), {} once SLURM forgot it."""
    res = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    return dict(field.split("=", 1) for field in res.stdout.split() if "=" in field)


def wait_for(what, condition, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@needs_slurm
def test_a_preempted_job_requeues_itself_and_ends_as_an_uninterrupted_run(cluster):
    folder, env = cluster
    run, log = folder / "run", folder / "job.out"
    env = {**env, "NPROC_PER_NODE": "2", "SNCLR_PORT": str(free_port())}
    sub = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={log}",
                          str(ROOT / "tools" / "slurm.sbatch"), *RUN, "--output-dir", str(run)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    started = time.time()
    # mid-run: the first epoch saved, the job still running; then SLURM's warning before the
    # time limit, as --signal=B:TERM@120 sends it: SIGTERM to the batch script alone
    wait_for("the first epoch's checkpoint", lambda: (run / "checkpoint.pth").exists(), 300)
    assert job_state(job, env).get("JobState") == "RUNNING", log.read_text()[-3000:]
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=env, check=True, timeout=30)
    wait_for("the requeued job's end", lambda: job_state(job, env).get("JobState") in
             ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600, every=1.0)
    state, out = job_state(job, env), log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, out[-4000:])
    assert "requeued, the next run resumes from it" in out and "restart 1" in out, out[-4000:]
    assert "resumed from" in out, out[-4000:]
    print(f"SLURM test: submitted, preempted, requeued and finished in {time.time() - started:.0f} s")
    # the same command, never interrupted, outside SLURM
    straight = folder / "straight"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "train.py"), *RUN, "--output-dir",
                          str(straight)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = torch.load(run / "checkpoint.pth", weights_only=True)
    b = torch.load(straight / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step_in_epoch"] == b["step_in_epoch"] == 0
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [e["epoch"] for e in read_log(run / "log.txt")] == [e["epoch"] for e in read_log(straight / "log.txt")]


def test_the_script_refuses_to_start_without_its_folders(tmp_path):
    """Outside SLURM, or without --output-dir or --data-path: one line, status 2, nothing made."""
    script = str(ROOT / "tools" / "slurm.sbatch")
    cases = [({}, [], "submit it with sbatch"),
             ({"SLURM_JOB_ID": "7"}, ["--dataset", "folder"], "give --output-dir"),
             ({"SLURM_JOB_ID": "7"}, ["--output-dir", str(tmp_path / "o")], "give --data-path")]
    for extra, args, said in cases:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        res = subprocess.run(["bash", script, *args], cwd=tmp_path, capture_output=True, text=True,
                             env={**env, **extra}, timeout=30)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and said in lines[0], res.stderr
    assert not (tmp_path / "o").exists()
