"""The paper's ablations at equal budget: K = 0 (InfoNCE / MoCo v3), positiveness cosine /
sharper cosine (a temperature) / attention / attention with a learned scale / hard / none, loss
form code / paper, and K in {1, 5, 30}, several seeds each, beside the untrained encoder of each
seed. Besides kNN and linear top-1, each row reports what the soft neighbors did in the last
epoch (monitors/neighbor_quality.py): the share of neighbors of the query's class (nn_agree), the share
of w that lands on them (w_agree) and the AUROC of w for telling them from other-class ones.

Every run is a plain `train.py` command (printed before it starts) followed by an
`eval_linear.py --cache-features` linear probe of its checkpoint; the kNN top-1 is train.py's
final monitor. One JSON per run goes to RESULTS/ablation_<name>_s<seed>.json (finished runs
are skipped, so the sweep resumes), and RESULTS/ablations.json plus a Markdown table summarise
mean and spread over seeds. Budget, device and dataset are options, so the same sweep runs on
CIFAR or on a GPU:

    python -m tools.ablations --epochs 2 --seeds 0 1 2                      # the CPU sweep in docs/results.md
    python -m tools.ablations --device cuda --epochs 100 --seeds 0 --jobs 4 \\
        --only infonce cosine cosine-t0.1 attention                    # one GPU, core variants
    python -m tools.ablations --dataset cifar10 --epochs 200 --device cuda \\
        --train-args "--arch resnet18 --batch-size 512 --queue-size 4096 --workers 8"
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from positiveness import RULES
from runtime.checkpoint import ConfigError, read_log, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py, eval_linear.py: from any folder

# name -> train.py options on top of the base recipe; "cosine" is the default SNCLR (K = 5).
# Every positiveness rule of positiveness.RULES is a variant; the order is the order of the runs.
VARIANTS = {
    "infonce": ["-K", "0"],
    **{rule: [] if rule == "cosine" else ["--positiveness", rule] for rule in RULES},
    "cosine-t0.1": ["--positiveness-t", "0.1"],
    "attention-gamma": ["--positiveness", "attention", "--learn-gamma"],
    "cosine-t0.03": ["--positiveness-t", "0.03"],
    "paper-form": ["--loss-form", "paper"],
    "K1": ["-K", "1"],
    "K30": ["-K", "30"],
}
# The CPU demo recipe of README.md: ResNet-18 with torchvision's stem on 28 px Fashion-MNIST.
BASE = ("--arch resnet18 --stem imagenet --batch-size 256 --queue-size 4096 -K 5 --dim 128 "
        "--mlp-dim 1024 --optimizer lars --lr 0.3 --weight-decay 1e-5 --tau 0.2 --warmup-epochs 0.5 "
        "--workers 1 --knn-every 0")


def get_args_parser():
    p = argparse.ArgumentParser("SNCLR ablations", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-path", default=None, help="passed to train.py (default: its own)")
    p.add_argument("--epochs", type=int, default=2, help="the equal budget of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="variants to run")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--train-args", default=BASE, help="base train.py options shared by every run")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs (cached features)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (a GPU has room for several small "
                   "runs; their output goes to RUNS/<run>/stdout.txt)")
    p.add_argument("--runs", default="runs/ablations", help="train.py output dirs")
    p.add_argument("--results", default="results", help="where the JSON results go")
    return p


def run(cmd: list, log_file=None) -> None:
    """Run a command (printed first); with log_file its output goes there instead of here.

    A failed command ends the sweep with status 1 and its own `error:` line last on stderr,
    never under a traceback: here it printed the line itself; from log_file it is repeated."""
    print("+", shlex.join(cmd), flush=True)
    if log_file is None:
        status = subprocess.run(cmd).returncode
    else:
        with open(log_file, "w") as f:
            status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if status == 0:
        return
    if log_file is None:
        raise SystemExit(1)
    with open(log_file) as f:
        errors = [line.strip() for line in f if line.startswith("error: ")]
    raise SystemExit(f"{errors[-1]} (in {log_file})" if errors else
                     f"error: {os.path.basename(cmd[1])} exited with status {status}; its output is in {log_file}")


def probe(checkpoint: str, seed: int, args, *extra) -> list:
    """eval_linear.py's cached-feature linear probe (docs/evaluation.md)."""
    return [sys.executable, os.path.join(ROOT, "eval_linear.py"), checkpoint, "--cache-features", "--epochs",
            str(args.probe_epochs), "--batch-size", "256", "--lr", "0.5", "--workers", "1", "--device", args.device,
            "--seed", str(seed), *extra]


# Last-epoch figures of the neighbor-quality monitor carried into each row.
QUALITY = ("nn_agree", "nn_top1_agree", "w_agree", "w_same", "w_other", "w_auroc")


def train_command(name: str, seed: int, args) -> list:
    """The train.py command of one variant and seed."""
    out = os.path.join(args.runs, f"{name}_s{seed}")
    train = [sys.executable, os.path.join(ROOT, "train.py"), *shlex.split(args.train_args), *VARIANTS[name],
             "--dataset", args.dataset, "--epochs", str(args.epochs), "--seed", str(seed),
             "--device", args.device, "--output-dir", out]
    return train + (["--data-path", args.data_path] if args.data_path else [])


def settings(command: str) -> list:
    """A train.py command without what does not change the run: the interpreter, the script's
    path, --output-dir."""
    words = shlex.split(command)[2:]
    at = words.index("--output-dir")
    return words[:at] + words[at + 2:]


def check_partial_run(out: str, epochs: int) -> None:
    """Refuse a run folder left by a sweep of another --epochs: train.py would resume it (its
    --epochs may change on resume) and this sweep's figures would be of another budget."""
    path = os.path.join(out, "args.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        had = json.load(f).get("epochs")
    if had != epochs:
        raise SystemExit(f"error: {out} holds a run of --epochs {had}, this sweep asks for --epochs {epochs}; "
                         f"delete {out} to redo it, or give another --runs")


def one_run(name: str, seed: int, args) -> dict:
    """Pretrain one variant with one seed, probe it, and return its figures."""
    out = os.path.join(args.runs, f"{name}_s{seed}")
    train = train_command(name, seed, args)
    start = time.time()
    check_partial_run(out, args.epochs)
    os.makedirs(out, exist_ok=True)
    log_file = os.path.join(out, "stdout.txt") if args.jobs > 1 else None
    run(train, log_file)
    run(probe(os.path.join(out, "checkpoint.pth"), seed, args), log_file and log_file + ".probe")
    log = read_log(os.path.join(out, "log.txt"))
    with open(os.path.join(out, "eval_linear", "results.txt")) as f:
        linear = json.loads(f.read().splitlines()[-1])
    last = log[-1]
    if "knn_top1" not in last:  # train.py's final monitor did not run (e.g. interrupted there)
        raise SystemExit(f"error: {out}/log.txt has no final kNN figure for epoch {last['epoch']}; delete {out} "
                         f"and rerun to redo this run")
    return {"variant": name, "seed": seed, "epochs": args.epochs, "dataset": args.dataset,
            "knn_random_init": log[0]["knn_top1"], "knn_top1": last["knn_top1"],
            "linear_top1": linear["top1"], "final_loss": last["loss"], "w_mean": last["w_mean"],
            **{k: last[k] for k in QUALITY + ("gamma",) if k in last},
            "images_per_s": statistics.mean(e["images_per_s"] for e in log[1:]),
            "minutes": (time.time() - start) / 60, "command": shlex.join(train)}


def random_init_row(seed: int, args) -> dict:
    """The untrained encoder of the same seed: kNN from train.py's own "random init" monitor
    (the first line of every log), linear top-1 from the same probe with --random-init."""
    out = os.path.join(args.runs, f"{args.only[0]}_s{seed}")  # any run of this seed: same arch and data
    run(probe(os.path.join(out, "checkpoint.pth"), seed, args, "--random-init"))
    log = read_log(os.path.join(out, "log.txt"))
    with open(os.path.join(out, "eval_linear_random", "results.txt")) as f:
        linear = json.loads(f.read().splitlines()[-1])
    return {"variant": "random-init", "seed": seed, "epochs": 0, "dataset": args.dataset,
            "knn_random_init": log[0]["knn_top1"], "knn_top1": log[0]["knn_top1"],
            "linear_top1": linear["top1"]}


def summarise(rows: list) -> dict:
    """Per variant: mean, sample standard deviation, min and max over seeds."""
    table = {}
    for name in ("random-init", *VARIANTS):
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        entry = {"seeds": [r["seed"] for r in mine]}
        for key in ("knn_top1", "linear_top1", "knn_random_init", "w_mean", *QUALITY, "gamma", "minutes"):
            vals = [r[key] for r in mine if r.get(key) is not None]
            if not vals:  # e.g. the random-init row has no positiveness; InfoNCE no neighbors
                continue
            entry[key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "min": min(vals), "max": max(vals)}
        table[name] = entry
    return table


def markdown(table: dict) -> str:
    lines = ["| variant | kNN top-1 | linear top-1 | mean w | nn_agree | w_agree | w AUROC | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in table.items():
        def fmt(key, digits=2, scale=1.0):
            if key not in e:
                return "-"
            return f"{scale * e[key]['mean']:.{digits}f} ± {scale * e[key]['std']:.{digits}f}"
        lines.append(f"| {name} | {fmt('knn_top1')} | {fmt('linear_top1')} | {fmt('w_mean', 3)} | "
                     f"{fmt('nn_agree', 1, 100)} | {fmt('w_agree', 1, 100)} | {fmt('w_auroc', 3)} | "
                     f"{len(e['seeds'])} |")
    return "\n".join(lines)


def result(name: str, seed: int, args) -> dict:
    """A finished run's figures, running it first if its result file does not exist yet. A
    result of other settings (epochs, device, data, base options) is an error, not reused."""
    path = os.path.join(args.results, f"ablation_{name}_s{seed}.json")
    if not os.path.exists(path):
        row = random_init_row(seed, args) if name == "random-init" else one_run(name, seed, args)
        save(path, row)  # atomic: only finished runs leave a result
    with open(path) as f:
        row = json.load(f)
    wanted = shlex.join(train_command(name, seed, args)) if name != "random-init" else None
    if wanted and settings(row["command"]) != settings(wanted):
        raise SystemExit(f"error: {path} holds a run of other settings ({shlex.join(settings(row['command']))}); "
                         f"give another --results and --runs for these")
    return row


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    with ThreadPoolExecutor(args.jobs) as pool:  # each job is a train.py process
        trained = [pool.submit(result, name, seed, args) for seed in args.seeds for name in args.only]
        try:
            rows = [job.result() for job in trained]
        except SystemExit:  # a run failed: start no other (those running finish first)
            pool.shutdown(cancel_futures=True)
            raise
    rows += [result("random-init", seed, args) for seed in args.seeds]  # reuses a run's checkpoint
    table = summarise(rows)
    print(markdown(table), flush=True)  # before the file: a full disk loses nothing
    save(os.path.join(args.results, "ablations.json"), {"rows": rows, "summary": table})


def save(path: str, obj) -> None:
    """write_json (atomic; the folder made when the first result is ready), its error as this
    script's one line."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json(path, obj)
    except OSError as e:
        raise SystemExit(f"error: cannot create {os.path.dirname(path)}: {e.strerror}") from None
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
