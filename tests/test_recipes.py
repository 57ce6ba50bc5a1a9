"""The recipes behind train.py's defaults: MoCo v3's ResNet and ViT settings."""
import torch

import train
from model import SNCLR
from runtime import options
from conftest import TINY


def test_resnet_and_vit_defaults_follow_mocov3():
    resnet = options.parse_args(["--arch", "resnet50"])
    vit = options.parse_args(["--arch", "vit_small"])
    assert (resnet.crop_min, resnet.optimizer, resnet.lr, resnet.tau) == (0.2, "lars", 0.6, 1.0)
    assert (vit.crop_min, vit.optimizer, vit.lr, vit.tau) == (0.08, "adamw", 1.5e-4, 0.2)
    assert (resnet.knn_train_size, resnet.knn_test_size) == (100_000, 10_000)      # imagenet monitor subsets
    m = SNCLR("resnet18", **TINY, num_neighbors=0, queue_size=8)
    assert all(b.bn2.weight.abs().sum() == 0 for b in m.backbone.layer1)          # zero_init_residual
    v = SNCLR("vit_tiny", **TINY, num_neighbors=0, queue_size=8).backbone
    from model import sincos_position_embedding
    assert torch.equal(v.encoder.pos_embedding, sincos_position_embedding(4, 192))  # fixed, 16 px / 4
    assert not v.encoder.pos_embedding.requires_grad and v.class_token.abs().max() < 1e-5
    opt = train.build_optimizer(SNCLR("vit_tiny", **TINY, num_neighbors=0, queue_size=8), vit)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1  # AdamW decays all

