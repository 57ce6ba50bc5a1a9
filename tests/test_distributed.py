"""Several processes: training and the kNN monitor on two gloo ranks against one process."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from runtime import distributed
from model import SNCLR
from conftest import TINY, free_port, _CountingFlatten, _knn_sets


# -------------------------------------------------------------- 2 processes ---
def _model_and_batch():
    """A tiny SNCLR in training mode with a full queue (so the first step uses K = 2 neighbors)
    and a global batch of 8 image pairs."""
    torch.manual_seed(0)
    m = SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=32)
    m.queue.enqueue(torch.randn(32, TINY["dim"]))
    return m, torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)


def _two_rank_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    from runtime.batch_norm import convert_to_global_batch_norm
    from runtime.distributed import wrap_ddp
    from monitors.neighbor_quality import NeighborQuality
    from train import train_step
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # (1) one step in training mode, each rank 4 of the 8 pairs, batch norm over the global batch
    # (as train.py runs several processes): the same step as one process on all 8
    m, x1, x2 = _model_and_batch()
    m = convert_to_global_batch_norm(m)
    mine = slice(4 * rank, 4 * rank + 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss, _ = train_step(m, wrap_ddp(m, torch.device("cpu")), x1[mine], x2[mine], opt, scaler, 0.99, rank)
    mean, one_step = distributed.all_reduce_sum(loss) / 2, m.state_dict()
    # (2) real DDP steps: the queues, weights and batch-norm statistics stay identical on both ranks
    torch.manual_seed(0)
    m = convert_to_global_batch_norm(SNCLR("resnet18", **TINY, num_neighbors=2, queue_size=32))
    ddp = wrap_ddp(m, torch.device("cpu"))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)  # each rank sees different images
    quality = NeighborQuality(torch.device("cpu"), sample_rows=2)
    for _ in range(3):
        labels = torch.randint(0, 3, (4,))
        train_step(m, ddp, torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), opt, scaler, 0.99, rank,
                   labels=labels, quality=quality)
    torch.save({"mean": mean, "one_step": one_step, "state": m.state_dict(), "quality": quality.summary()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


def test_two_process_gloo_step_equals_one_process_and_ranks_agree(tmp_path):
    from train import train_step
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    m, x1, x2 = _model_and_batch()  # the same step in this single process, on all 8 pairs
    single, _ = train_step(m, m, x1, x2, torch.optim.SGD(m.parameters(), lr=0.1),
                           torch.amp.GradScaler("cpu", enabled=False), 0.99)
    for r in (r0, r1):
        assert r["mean"].item() == pytest.approx(single.item(), rel=1e-5)
        for key, value in m.state_dict().items():  # weights, EMA, queue, batch-norm statistics
            assert torch.allclose(r["one_step"][key].float(), value.float(), atol=1e-5), key
    assert int(r0["state"]["queue.filled"]) == 3 * 8  # 3 steps x global batch 8
    assert (r0["state"]["queue.labels"][:24] >= 0).all()  # both ranks' labels, gathered beside the keys
    assert r0["quality"] == r1["quality"] and 0 <= r0["quality"]["nn_agree"] <= 1  # summed over ranks
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:  # weights (DDP), queue (same gathered keys), batch-norm statistics (global)
        assert torch.allclose(r0["state"][key].float(), r1["state"][key].float(), atol=1e-6), key


# ------------------------------------------------------------------- monitors/knn.py ---
def _knn_two_rank_worker(rank, port, out_dir):
    import threading
    from monitors.knn import encode_shard, knn_accuracy, sharded_knn_predict
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = distributed.init_distributed("cpu")
    train_set, test_set = _knn_sets()
    args = (4, 0, env.device, rank, 2)                      # batches of 4: 5 per rank for the bank
    bank = encode_shard(torch.nn.Flatten(), train_set, *args)
    test = encode_shard(torch.nn.Flatten(), test_set, *args)
    out = {"bank_rows": bank.real, "bank_index": bank.index[:bank.real], "test_index": test.index[:test.real],
           "acc": {k: knn_accuracy(torch.nn.Flatten(), train_set, test_set, 5, *args, k=k) for k in (5, 100)},
           "scores": sharded_knn_predict(bank.feats[:bank.real], bank.labels[:bank.real],
                                         distributed.all_gather(test.feats), 5, 100)[:test.real],
           "scores_t": sharded_knn_predict(bank.feats[:bank.real], bank.labels[:bank.real],
                                           distributed.all_gather(test.feats), 5, 100, t=0.5)[:test.real],
           "acc_t": knn_accuracy(torch.nn.Flatten(), train_set, test_set, 5, *args, k=37, t=100.0)}
    # the bank as its own queries, k = 1: each item finds itself; a padded query counted twice would give 38/37
    out["self"] = knn_accuracy(torch.nn.Flatten(), train_set, train_set, 5, *args, k=1)
    stop, net = threading.Event(), _CountingFlatten()
    if rank == 1:                                           # SIGTERM on one rank only: both stop
        stop.set()
    out["stopped"], out["calls"] = knn_accuracy(net, train_set, test_set, 5, *args, stop=stop), net.calls
    # SIGTERM on rank 1 during its 2nd bank batch: the ranks next agree before the first test
    # batch (checks every 10 batches), so both encode the 5 bank batches and stop there
    stop = threading.Event()
    net = _CountingFlatten(stop, set_at=2) if rank == 1 else _CountingFlatten()
    out["stopped_late"], out["calls_late"] = knn_accuracy(net, train_set, test_set, 5, *args, stop=stop), net.calls
    torch.save(out, os.path.join(out_dir, f"knn{rank}.pt"))
    distributed.cleanup()


def test_knn_sharded_two_process_gloo_equals_single_device(tmp_path):
    from monitors.knn import knn_predict
    mp.spawn(_knn_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"knn{r}.pt", weights_only=True) for r in range(2))
    train_set, test_set = _knn_sets()
    (x, y), (xq, yq) = train_set.tensors, test_set.tensors
    bank, queries = F.normalize(x.flatten(1), dim=1), F.normalize(xq.flatten(1), dim=1)
    # each rank keeps about half of the bank, padding dropped: 19 + 18 distinct items
    assert (r0["bank_rows"], r1["bank_rows"]) == (19, 18)
    assert sorted(torch.cat([r0["bank_index"], r1["bank_index"]]).tolist()) == list(range(37))
    for k in (5, 100):                                      # k = 100 > 37: every item votes once
        single = knn_predict(bank, y, queries, 5, k).argmax(dim=1)
        assert r0["acc"][k] == r1["acc"][k] == 100.0 * (single == yq).sum().item() / 23
    assert r0["self"] == r1["self"] == 100.0
    assert 40 < r0["acc"][5] < 100                          # neither perfect nor chance (20 %)
    full = knn_predict(bank, y, queries, 5, 100)            # a padded bank item would vote twice
    for r in (r0, r1):
        assert torch.allclose(r["scores"], full[r["test_index"]], rtol=1e-5)
    full_t = knn_predict(bank, y, queries, 5, 100, t=0.5)                # --knn-t reaches the vote
    assert not torch.allclose(full_t, full, rtol=1e-3)
    for r in (r0, r1):
        assert torch.allclose(r["scores_t"], full_t[r["test_index"]], rtol=1e-5)
    flat = knn_predict(bank, y, queries, 5, 37, t=100.0).argmax(dim=1)   # every item votes almost alike
    assert r0["acc_t"] == r1["acc_t"] == 100.0 * (flat == yq).sum().item() / 23
    sharp = knn_predict(bank, y, queries, 5, 37).argmax(dim=1)          # the default t = 0.07
    assert (sharp == yq).sum() != (flat == yq).sum()                    # so ignoring t would show
    assert r0["stopped"] is None and r1["stopped"] is None and r0["calls"] == r1["calls"] == 0
    assert r0["stopped_late"] is None and r1["stopped_late"] is None
    assert r0["calls_late"] == r1["calls_late"] == 5


def test_torchrun_two_processes_train_the_one_process_run(smoke_run, tmp_path):
    """train.py under torchrun on 2 CPU processes (gloo, batch norm over the global batch, the
    stop agreement, rank-0 writes) logs the losses of the same command in one process."""
    import subprocess
    import sys
    from runtime.checkpoint import read_log
    from conftest import ROOT, SMOKE
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "train.py"), *SMOKE, "--epochs", "2",
                          "--knn-every", "0", "--output-dir", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = read_log(out / "log.txt"), read_log(smoke_run / "log.txt")
    assert [e["epoch"] for e in two] == [0, 1, 2]
    for a, b in zip(two[1:], one[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 2
