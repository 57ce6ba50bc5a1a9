"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, InstDisc).

The monitor of every self-supervised run: no training, so it also measures a random encoder.
A test image votes with its k most cosine-similar training images, each vote weighted by
exp(cos / T); k = 200 and T = 0.07 are InstDisc's values, used by MoCo, DINO and solo-learn.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distributed import all_gather


@torch.no_grad()
def extract_features(backbone, dataset, batch_size: int, workers: int, device, rank: int = 0,
                     world_size: int = 1, desc: str = "features", normalize: bool = True):
    """Backbone features (L2-normalised unless normalize=False) and labels of every item:
    ((n, D) float, (n,) long).

    Each rank encodes the items rank, rank + R, ... (padded with a repeated item so all ranks
    run the same number of batches) and the shards are gathered into dataset order.
    """
    n = len(dataset)
    per_rank = -(-n // world_size)
    mine = list(range(rank, n, world_size))
    mine += [mine[0] if mine else 0] * (per_rank - len(mine))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            f = backbone(x.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())  # (b, D)
        labels.append(torch.as_tensor(y, device=device))
    backbone.train(was_training)
    feats, labels = all_gather(torch.cat(feats)), all_gather(torch.cat(labels))  # (R*per_rank, .)
    index = all_gather(torch.tensor(mine, device=device))
    out_f = feats.new_empty(n, feats.shape[1])
    out_l = labels.new_empty(n)
    out_f[index], out_l[index] = feats, labels  # padding rows rewrite an item with itself
    return out_f, out_l


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes: int, k: int = 200,
                t: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Class scores (n_test, C): score_c = sum over the k nearest of exp(cos / t) * [label = c].

    Features must be L2-normalised. Test rows are processed in chunks to bound memory.
    """
    k = min(k, train_feats.shape[0])
    scores = []
    for q in test_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)                    # (b, k)
        votes = F.one_hot(train_labels[idx], num_classes).float()        # (b, k, C)
        scores.append((votes * (sim / t).exp()[..., None]).sum(dim=1))   # (b, C)
    return torch.cat(scores)


def knn_accuracy(backbone, train_set, test_set, num_classes: int, batch_size: int, workers: int,
                 device, rank: int = 0, world_size: int = 1, k: int = 200, t: float = 0.07) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier of `backbone` features."""
    args = (batch_size, workers, device, rank, world_size)
    train_f, train_l = extract_features(backbone, train_set, *args, desc="kNN bank")
    test_f, test_l = extract_features(backbone, test_set, *args, desc="kNN test")
    pred = knn_predict(train_f, train_l, test_f, num_classes, k, t).argmax(dim=1)
    return 100.0 * (pred == test_l).float().mean().item()
