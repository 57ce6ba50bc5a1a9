"""Weighted k-nearest-neighbor classification on frozen features (Wu et al. 2018, InstDisc).

The monitor of every self-supervised run: no training, so it also measures a random encoder.
A test image votes with its k most cosine-similar training images, each vote weighted by
exp(cos / T); k = 200 and T = 0.07 are InstDisc's values, used by MoCo, DINO and solo-learn.

Sharded over R ranks (knn_accuracy). Rank r encodes the training items r, r + R, ... and keeps
them, its bank shard, on its own device: float16 on CUDA, float32 on the CPU (half-precision
matmuls are slow on CPUs, and float32 keeps one CPU process bit-exact with knn_predict). It
encodes its shard of the test set too; the test features are gathered (same precision) so every
rank scores every query against its own shard only, keeping k candidates per query. One
all_to_all sends each query's candidates to the rank that encoded it, which merges the R x k
candidates into the k nearest of the whole bank and votes; the correct counts are summed over
ranks. No rank holds the whole bank, and each query's top-k and vote are computed once. One
process is the single-device computation (knn_predict's). On CUDA the similarities come out of
float16 matmuls: rounded by at most about 2^-12 near 1, so the weights exp(cos / T) are within
about 0.5 % of float32's, which can move a prediction only at a near-tie of two classes.

Memory per rank (D = feature size, n_test padded to a multiple of R, b = query chunk):
    bank shard      n_train / R x D x 2 bytes (float16; 4 bytes on the CPU)
    queries         n_test x D x 2 bytes, twice that while gathering
    top-k buffers   n_test x k x 8 bytes sent + the same received (float32 similarity, label)
    working set     b x n_train / R x 2 bytes of similarities + 2^24 floats (64 MB) of votes
ImageNet ResNet-50 (D = 2048, 1,281,167 train / 50,000 val images, k = 200, b = 256):
    R = 8:  bank shard 656 MB, queries 205 MB (410 MB gathering), top-k 2 x 80 MB,
            similarities 82 MB: about 1.2 GB at peak (gathering the whole bank in float32 instead
            would take 10.5 GB on every rank and about 21 GB while gathering).
    R = 32: bank shard 164 MB, queries 205 MB (410 MB gathering), top-k 2 x 80 MB,
            similarities 21 MB: about 0.6 GB at peak.
The ImageNet monitor's sets, fixed subsets of 100k train and 10k val images (train.py
--knn-train-size 100000 --knn-test-size 10000): bank shard 51 MB (R = 8) / 13 MB (R = 32),
queries 41 MB, top-k 2 x 16 MB.

Cost, assuming a training step does about 8 forward-equivalents per image (two views through
the online encoder, forward + backward, and through the momentum encoder, forward only): an
epoch is 1.28M x 8 = 10.2M; the monitor does one forward per image, 110k, plus the scoring
(10k x 100k x 2048 multiply-adds, about 0.5 % of those forwards): about 1.1 % of an epoch. The
full sets (1.33M forwards) would cost about 13 % of an epoch, every epoch. If data loading, not
compute, bounds the run, the monitor decodes 110k images against the epoch's 1.28M (at most
8.6 %, less since its centre crop is cheaper than two augmented views). --knn-every N divides
either figure by N.
"""
import threading
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from images.datasets import closing_workers, ignore_stop_signals
from runtime.distributed import all_gather, all_reduce_sum, world_size as process_count
from runtime.progress import show_bars

STOP_CHECK_EVERY = 10  # batches between the collectives that agree on stopping (SIGTERM, Ctrl-C)
VOTE_ELEMENTS = 2 ** 24  # one-hot votes (rows x k x C floats) materialised at once: 64 MB


class Shard(NamedTuple):
    """One rank's part of a dataset: the items rank, rank + R, ..., then padding repeats.

    feats (P, D), labels (P,), index (P,) dataset positions; rows [real:] are padding.
    """
    feats: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    real: int


def _any_rank_stopped(stop: Optional[threading.Event], world_size: int, device) -> bool:
    """Whether the event is set on any rank; a collective, so every rank must call it."""
    if world_size == 1:
        return stop is not None and stop.is_set()
    flag = torch.tensor([float(stop is not None and stop.is_set())], device=device)
    return all_reduce_sum(flag).item() > 0


@torch.no_grad()
def encode_shard(backbone, dataset, batch_size: int, workers: int, device, rank: int = 0,
                 world_size: int = 1, desc: str = "features", normalize: bool = True,
                 dtype: torch.dtype = torch.float32, stop: Optional[threading.Event] = None,
                 stop_every: int = STOP_CHECK_EVERY) -> Optional[Shard]:
    """Backbone features (L2-normalised unless normalize=False) of this rank's items, as dtype.

    Rank r encodes the items r, r + R, ... padded with a repeated item to P = ceil(n / R), so
    all ranks run the same number of batches (and collectives). With stop (a threading.Event,
    pass it on every rank or on none) the ranks agree every stop_every batches whether any has
    it set (every batch with one process) and then all return None.
    """
    n = len(dataset)
    per_rank = -(-n // world_size)
    mine = list(range(rank, n, world_size))
    real = len(mine)
    mine += [mine[0] if mine else 0] * (per_rank - real)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)  # the main process saves and stops
    was_training = backbone.training
    backbone.eval()
    feats, labels, at, stopped = None, torch.empty(per_rank, dtype=torch.long, device=device), 0, False
    try:
        with closing_workers(loader) as batches:
            for i, (x, y) in enumerate(tqdm(batches, desc=desc, disable=not show_bars(rank == 0), leave=False)):
                if stop is not None and (world_size == 1 or i % stop_every == 0) \
                        and _any_rank_stopped(stop, world_size, device):
                    stopped = True
                    break
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    f = backbone(x.to(device, non_blocking=True)).float()             # (b, D)
                if feats is None:  # written in place: no list of batches + concatenated copy
                    feats = torch.empty(per_rank, f.shape[1], dtype=dtype, device=device)  # (P, D)
                feats[at:at + len(f)] = F.normalize(f, dim=1) if normalize else f
                labels[at:at + len(f)] = torch.as_tensor(y, device=device)
                at += len(f)
    finally:
        backbone.train(was_training)
    if stopped:
        return None
    return Shard(feats, labels, torch.tensor(mine, device=device), real)


@torch.no_grad()
def extract_features(backbone, dataset, batch_size: int, workers: int, device, rank: int = 0,
                     world_size: int = 1, desc: str = "features", normalize: bool = True,
                     stop: Optional[threading.Event] = None):
    """Backbone features (L2-normalised unless normalize=False) and labels of every item, on
    every rank: ((n, D) float32, (n,) long) in dataset order (the cached-feature probe's input);
    (None, None) on every rank when a rank's stop event was set (encode_shard).

    Each rank encodes its shard (encode_shard) and the shards are gathered.
    """
    shard = encode_shard(backbone, dataset, batch_size, workers, device, rank, world_size, desc, normalize,
                         stop=stop)
    if shard is None:
        return None, None
    feats, labels = all_gather(shard.feats), all_gather(shard.labels)   # (R*P, D), (R*P,)
    index = all_gather(shard.index)                                     # (R*P,)
    out_f = feats.new_empty(len(dataset), feats.shape[1])
    out_l = labels.new_empty(len(dataset))
    out_f[index], out_l[index] = feats, labels  # padding rows rewrite an item with itself
    return out_f, out_l


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k: int = 200,
                t: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Class scores (n_test, C): score_c = sum over the k nearest of exp(cos / t) * [label = c].

    Features must be L2-normalised. Test rows are processed in chunks to bound memory. The
    single-device reference of sharded_knn_predict.
    """
    k = min(k, train_feats.shape[0])
    scores = []
    for q in test_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)                    # (b, k)
        votes = F.one_hot(train_labels[idx], num_classes).float()        # (b, k, C)
        scores.append((votes * (sim / t).exp()[..., None]).sum(dim=1))   # (b, C)
    return torch.cat(scores)


def _vote(sim, labels, num_classes: int, t: float) -> torch.Tensor:
    """knn_predict's vote, score_c = sum_j exp(sim_j / t) [labels_j = c]: (n, k) -> (n, C).

    In row chunks of at most VOTE_ELEMENTS one-hot entries (ImageNet: 83 rows of 200 x 1000).
    """
    rows = max(1, VOTE_ELEMENTS // max(1, sim.shape[1] * num_classes))
    scores = []
    for s, l in zip(sim.split(rows), labels.split(rows)):
        votes = F.one_hot(l, num_classes).float()                        # (b, k, C)
        scores.append((votes * (s / t).exp()[..., None]).sum(dim=1))     # (b, C)
    return torch.cat(scores) if scores else sim.new_zeros(0, num_classes)


@torch.no_grad()
def sharded_knn_predict(bank_feats, bank_labels, queries, num_classes: int, k: int = 200,
                        t: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Class scores (P, C) of this rank's queries, over the bank shards of all R ranks.

    bank_feats (n_r, D), bank_labels (n_r,): this rank's shard, no padding rows (a padded item
    would vote twice). queries (R*P, D): every rank's P queries, rank-major (all_gather), the
    same on every rank. All L2-normalised. Equals knn_predict on the concatenated shards for
    this rank's block of queries (up to which of equally similar items make the k-th place).

    Rank r scores all R*P queries against its shard, keeping the top k (padded with -inf when
    n_r < k): (R*P, k). all_to_all_single sends block s (rows s*P ..) to rank s, which receives
    every rank's candidates for its P queries, (R, P, k), and keeps the k most similar of R*k.
    """
    world = process_count()
    # the global k: a shard alone does not know whether the whole bank has k items
    k = min(k, int(all_reduce_sum(torch.tensor([bank_feats.shape[0]], device=queries.device)).item()))
    k_r = min(k, bank_feats.shape[0])
    # similarity and label in one float32 tensor: one collective; labels are exact below 2^24
    cand = torch.empty(queries.shape[0], k, 2, device=queries.device)    # (R*P, k, 2)
    cand[:, k_r:, 0], cand[:, k_r:, 1] = -float("inf"), 0.0              # exp(-inf / t) = 0 votes
    for at, q in zip(range(0, queries.shape[0], chunk), queries.split(chunk)):
        sim, idx = (q @ bank_feats.T).topk(k_r, dim=1)                   # (b, k_r)
        cand[at:at + len(q), :k_r, 0] = sim.float()
        cand[at:at + len(q), :k_r, 1] = bank_labels[idx].float()
    if world == 1:  # this rank's top-k is the whole bank's: the merge would be a no-op
        return _vote(cand[..., 0], cand[..., 1].long(), num_classes, t)
    mine = torch.empty_like(cand)
    dist.all_to_all_single(mine, cand)                   # block r of mine: rank r's candidates
    mine = mine.view(world, -1, k, 2)                    # (R, P, k, 2)
    scores = []
    for block in mine.split(chunk, dim=1):               # merged in chunks: no (P, R*k) copy
        block = block.permute(1, 0, 2, 3).reshape(block.shape[1], world * k, 2)  # (b, R*k, 2)
        sim, pos = block[..., 0].topk(k, dim=1)                                  # (b, k)
        scores.append(_vote(sim, block[..., 1].gather(1, pos).long(), num_classes, t))  # (b, C)
    return torch.cat(scores)


def knn_accuracy(backbone, train_set, test_set, num_classes: int, batch_size: int, workers: int,
                 device, rank: int = 0, world_size: int = 1, k: int = 200, t: float = 0.07, *,
                 stop: Optional[threading.Event] = None, chunk: int = 256) -> Optional[float]:
    """Top-1 accuracy (%) of the weighted kNN classifier of `backbone` features, sharded:
    100 x #{test items whose argmax_c score_c (knn_predict's) is their label} / n_test.

    Each rank encodes its shards of both sets (bank kept, padding rows dropped), the test
    features are gathered, sharded_knn_predict scores this rank's queries and the hits are
    summed over ranks. Same value on every rank. None (on every rank) once stop, a threading.Event passed on every
    rank or none, is set on any rank: encoding stops within STOP_CHECK_EVERY batches.
    """
    if world_size != process_count():  # the merge runs over the process group's ranks
        raise ValueError(f"world_size {world_size} but {process_count()} processes in the group")
    args = (batch_size, workers, device, rank, world_size)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    bank = encode_shard(backbone, train_set, *args, desc="kNN bank", dtype=dtype, stop=stop)
    if bank is None:
        return None
    test = encode_shard(backbone, test_set, *args, desc="kNN test", dtype=dtype, stop=stop)
    if test is None:
        return None
    queries = all_gather(test.feats)                                     # (R*P, D)
    scores = sharded_knn_predict(bank.feats[:bank.real], bank.labels[:bank.real], queries,
                                 num_classes, k, t, chunk)               # (P, C) my queries
    hits = (scores[:test.real].argmax(dim=1) == test.labels[:test.real]).sum()
    return 100.0 * all_reduce_sum(hits).item() / len(test_set)
