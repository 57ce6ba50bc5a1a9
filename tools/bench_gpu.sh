#!/usr/bin/env bash
# The GPU rows of docs/gpu.md's table, measured anew on one GPU in under 8 minutes:
#
#   bash tools/bench_gpu.sh                          # from the repository root: one GPU, no network needed
#   DEVICE=cpu SMOKE=1 bash tools/bench_gpu.sh       # tiny sizes on the CPU: checks the script, not the speed
#
# In order of priority (the budget cuts the last parts first):
# (0) the check that the step train.py runs never waits for the GPU (tests/test_gpu_path.py, skipped
#     without CUDA);
# (1) tools/bench.py's SNCLR step with the recipe's optimiser (LARS), resnet50, 224 px, batch 256, bf16:
#     --channels-last, then --channels-last --compile (the search-scaling part cut to one queue
#     size and one K; PLAIN=1 adds the step without channels_last, last);
# (2) tools/bench.py --data: the workers' transform per worker (old PIL path, new crop-only path), the
#     batched augmentation at 224 and 32 px, and train.py's loop end to end on synthetic 500x375
#     JPEGs with 15 workers, --compile and channels_last as train.py uses them;
# (3) README.md's Fashion-MNIST demo recipe: seconds per epoch (epoch_s in log.txt) with the
#     batched augmentation on the device (3 epochs), and with PIL in 14 workers (2 epochs). Without
#     Fashion-MNIST on the machine, the same recipe runs on --dataset fake (60000 28 px images),
#     and a line says so.
# One compile is reused: every part shares one Inductor cache ($OUT/inductor_cache), so part (2)'s
# train.py --compile finds the ResNet-50 kernels part (1) compiled.
# Each part runs under `timeout`, all of them within BUDGET_S seconds; everything printed is also
# in $OUT/bench_gpu.log, beside the parts' JSON files and run folders. The table is printed
# whatever happened to the parts (n/a where one failed, timed out or was skipped). Exit status: 1
# when a check fails, i.e. part (0) fails or a part ends with an error (a timeout or a part cut
# by the budget is reported, not an error); else 0. SMOKE=1 checks that every part runs, not how
# fast: no time limit and no budget apply, so a busy machine cannot fail it, and every part must
# end with status 0.
#
# Environment: OUT (runs/bench), DEVICE (cuda), SMOKE (0), SMOKE_COMPILE (0: with SMOKE=1 the
# compiled step is skipped, compiling takes minutes on a CPU), BUDGET_S (440), PLAIN (0), PYTHON,
# FMNIST (the Fashion-MNIST folder: a copy in .data/fashion-mnist, else train.py's download in
# data/, else Debian's).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1  # the repository root: train.py, tests/, python -m tools.bench
OUT=${OUT:-runs/bench}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
SMOKE_COMPILE=${SMOKE_COMPILE:-0}
BUDGET_S=${BUDGET_S:-440}
PLAIN=${PLAIN:-0}
PY=${PYTHON:-$(command -v python3 || command -v python)}
if [ -z "${FMNIST:-}" ]; then
  if [ -d .data/fashion-mnist ]; then FMNIST=.data/fashion-mnist
  elif [ -d data/FashionMNIST/raw ]; then FMNIST=data  # where train.py downloads it
  else FMNIST=/usr/share/datasets/fashion-mnist; fi
fi
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)  # absolute: the parts run from the root, the cache path must not depend on it
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}  # one compile, reused
FM_DATA=missing
for f in "$FMNIST"/{,raw/,FashionMNIST/raw/}train-images-idx3-ubyte{,.gz}; do
  if [ -f "$f" ]; then FM_DATA=found; fi
done

# README.md's demo recipe, 3 epochs, the kNN monitor only before and after
FM=(--arch resnet18 --stem imagenet --batch-size 256 --queue-size 4096 -K 5 --dim 128
    --mlp-dim 1024 --optimizer lars --lr 0.3 --weight-decay 1e-5 --tau 0.2 --epochs 3 --warmup-epochs 0.5
    --knn-every 0 --device "$DEVICE")
if [ "$FM_DATA" = found ]; then
  FM_DATA=fashion-mnist
  FM+=(--dataset fashion-mnist --data-path "$FMNIST")
else
  FM_DATA=fake
  FM+=(--dataset fake --image-size 28 --fake-size 60000 --knn-train-size 5000 --knn-test-size 1000)
fi
if [ "$SMOKE" = 1 ]; then
  ARCH=resnet18
  TINY=(--arch resnet18 --device "$DEVICE" --batch-size 8 --image-size 32 --queue-size 1024 --dim 32 --mlp-dim 64
        --repeats 1)
  STEP=("${TINY[@]}" --scaling-queues 1024 --scaling-k 5)
  DATA=("${TINY[@]}" --data-images 80 --data-steps 4 --data-workers 2 --loader-images 8 --augment-device "$DEVICE")
  FM+=(--subset 512 --batch-size 128 --knn-train-size 1000 --knn-test-size 200 --epochs 2)
  if [ "$FM_DATA" = fake ]; then FM+=(--fake-size 2048); fi
  FM_WORKERS=1
else
  ARCH=resnet50
  STEP=(--arch resnet50 --device "$DEVICE" --batch-size 256 --image-size 224 --repeats 3 --scaling-queues 65536
        --scaling-k 30)
  DATA=(--arch resnet50 --device "$DEVICE" --batch-size 256 --image-size 224 --compile --data-images 1500
        --data-steps 60 --data-workers 15 --loader-images 200 --repeats 3)
  FM_WORKERS=14
fi
START=$SECONDS
FAILED=0   # checks that failed: part (0), or a part that ended with an error
CUT=0      # parts that timed out or that the budget skipped

part() {  # part NAME LIMIT_S COMMAND...: COMMAND under timeout, at most what the budget has left
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  if [ "$SMOKE" = 1 ]; then  # a smoke run checks that the part runs, however long it takes
    echo "== $name (no time limit: SMOKE=1): $*"
    "$@"
    rc=$?
    echo "== $name: exit status $rc after $((SECONDS - t0)) s"
    if ((rc != 0)); then FAILED=$((FAILED + 1)); fi
    return
  fi
  left=$((BUDGET_S - (SECONDS - START)))
  if ((limit > left)); then limit=$left; fi
  if ((limit < 10)); then
    echo "== $name: skipped, the ${BUDGET_S} s budget is spent"
    CUT=$((CUT + 1))
    return
  fi
  echo "== $name (at most $limit s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "== $name: exit status $rc after $((SECONDS - t0)) s$( ((rc == 124 || rc == 137)) && echo ', timed out')"
  if ((rc == 124 || rc == 137)); then CUT=$((CUT + 1)); elif ((rc != 0)); then FAILED=$((FAILED + 1)); fi
}

table() {  # the Markdown table, from the parts' JSON files and logs; n/a where a part failed
  OUT="$OUT" DEVICE="$DEVICE" ARCH="$ARCH" SMOKE="$SMOKE" FM_WORKERS="$FM_WORKERS" FM_DATA="$FM_DATA" "$PY" - <<'EOF'
import json, os, statistics

out, dev, arch, workers = os.environ["OUT"], os.environ["DEVICE"], os.environ["ARCH"], os.environ["FM_WORKERS"]
fm = "Fashion-MNIST demo" if os.environ["FM_DATA"] == "fashion-mnist" else "demo recipe on fake 28 px data (no Fashion-MNIST)"


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def step(suffix):
    result = load(f"{out}/step/bench_{dev}_{arch}{suffix}.json")
    return result and result["images_per_s"]["snclr"]


def epochs(name):  # "median s (each epoch's s)" from train.py's log.txt
    try:
        with open(f"{out}/{name}/log.txt") as f:
            seconds = [e["epoch_s"] for e in map(json.loads, f) if "epoch_s" in e]
    except (OSError, ValueError):
        return None
    return seconds and f"{statistics.median(seconds):.1f} ({', '.join(f'{s:.1f}' for s in seconds)})"


def fmt(value, spec=".0f"):
    return "n/a" if value is None else value if isinstance(value, str) else format(value, spec)


d = load(f"{out}/data/bench_data_{dev}.json") or {}
rows = [("SNCLR step, img/s (tools/bench.py, resnet50, 224 px, batch 256, bf16, LARS; 'before': SGD)", "856", "", step("")),
        ("  + channels_last", "1548", "", step("_channels_last")),
        ("  + channels_last + torch.compile of both backbones", "2359", ">= 2300", step("_channels_last_compile")),
        ("end to end, img/s (train.py's loop, synthetic JPEGs, 15 workers)", "152", ">= 2000",
         d.get("end_to_end_images_per_s")),
        ("  the step alone in the same loop, img/s", "", "", d.get("step_only_images_per_s")),
        ("  share of the loop's time waiting for data", "", "", d.get("data_wait_share") is not None and
         f"{100 * d['data_wait_share']:.0f} %" or None),
        ("loader, new path (crop to uint8), pairs/s per worker, 224 px from 500x375 JPEGs", "", ">= 100",
         d.get("loader_pairs_per_s_per_worker")),
        ("loader, old path (all PIL), pairs/s per worker", "about 13", "", d.get("loader_pairs_per_s_per_worker_pil")),
        ("augment.two_views, ms per batch of 256, 224 px (crop=False)", "", "", d.get("augment_ms_per_batch_224")),
        ("augment.two_views, ms per batch of 256, 32 px (crop=True)", "", "", d.get("augment_ms_per_batch_32")),
        (f"{fm}, s per epoch, batched on the device (median; each epoch)", "", "<= 2",
         epochs("fmnist_batched")),
        (f"{fm}, s per epoch, PIL in {workers} workers (median; each epoch)", "about 10", "",
         epochs("fmnist_workers"))]
print()
if os.environ["SMOKE"] == "1":
    print(f"SMOKE=1: tiny sizes on {dev} ({arch}, batch 8, few images and steps): the rows name the full run's "
          "settings, and these figures are not comparable with the targets.\n")
print(f"| figure | before (one H200, torch 2.11) | target | now ({d.get('device', dev)}, torch {d.get('torch', '?')}) |")
print("|---|---|---|---|")
for name, before, target, now in rows:
    print(f"| {name} | {before} | {target} | {fmt(now, '.1f' if isinstance(now, float) and now < 100 else '.0f')} |")
EOF
}

main() {
  echo "tools/bench_gpu.sh: DEVICE=$DEVICE SMOKE=$SMOKE OUT=$OUT FMNIST=$FMNIST, budget $BUDGET_S s, $(date -u +%FT%TZ)"
  "$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  if [ "$FM_DATA" = fake ]; then
    echo "Fashion-MNIST is not under $FMNIST: part (3) runs the demo recipe on --dataset fake (28 px) instead; its s/epoch stands in for the demo's"
  fi
  rm -f "$OUT"/step/bench_*.json "$OUT"/data/bench_data_*.json   # no figure of an earlier run in the table
  rm -rf "$OUT/fmnist_batched" "$OUT/fmnist_workers"               # train.py would resume from them
  # (0) the step train.py runs, both data paths, compiled or not: no host-device synchronisation (skipped without CUDA)
  local cut0=$CUT
  part "(0) no host sync in the training step" 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_path.py \
    -k never_waits_for_the_gpu
  if ((CUT > cut0)); then CUT=$cut0; FAILED=$((FAILED + 1)); fi   # a check that did not finish has failed
  # (1) the step: about a minute each on the GPU (compiling adds one or two)
  part "(1) step, channels_last" 90 "$PY" -m tools.bench "${STEP[@]}" --channels-last --out "$OUT/step"
  if [ "$SMOKE" != 1 ] || [ "$SMOKE_COMPILE" = 1 ]; then
    part "(1) step, channels_last + compile" 180 "$PY" -m tools.bench "${STEP[@]}" --channels-last --compile --warmup 3 \
      --out "$OUT/step"
  else
    echo "== (1) step, channels_last + compile: skipped (SMOKE=1; SMOKE_COMPILE=1 runs it)"
  fi
  # (2) the data paths and the loop end to end (--compile: the kernels of (1) from the shared cache)
  part "(2) data paths" 200 "$PY" -m tools.bench --data "${DATA[@]}" --out "$OUT/data"
  # (3) the demo recipe: batched on the device (--augment-device auto is that on CUDA), then PIL workers
  part "(3) $FM_DATA demo recipe, batched on $DEVICE" 90 \
    "$PY" train.py "${FM[@]}" --augment-device "$DEVICE" --output-dir "$OUT/fmnist_batched"
  part "(3) $FM_DATA demo recipe, PIL in $FM_WORKERS workers" 100 \
    "$PY" train.py "${FM[@]}" --epochs 2 --augment-device workers --workers "$FM_WORKERS" \
    --output-dir "$OUT/fmnist_workers"
  if [ "$PLAIN" = 1 ] || [ "$SMOKE" = 1 ]; then
    part "(1) step, plain" 90 "$PY" -m tools.bench "${STEP[@]}" --out "$OUT/step"
  fi
  echo "== total $((SECONDS - START)) s; $FAILED check(s) failed, $CUT part(s) timed out or cut by the budget"
  table
  return $((FAILED > 0))
}

main 2>&1 | tee "$OUT/bench_gpu.log"
exit "${PIPESTATUS[0]}"
