"""The SNCLR model: encoder f, projector g, predictor h, their momentum copies f', g', the
positiveness (Eq. 4) and the memory queue C (Eq. 3) (paper Sec. 3, Fig. 2), built as MoCo v3
builds its networks.

`SNCLR.forward` is Eq. 4 and Eq. 2 for both views; the step that composes it with the keys,
the search and the state changes is `train_step`, written out in train.py's docstring. No state
changes inside `forward`. With K = 0 (or while the queue holds fewer than K keys) the loss is
Eq. 1, so the same model is the MoCo v3 baseline. ResNets start with the last BN of each
residual branch at zero, ViTs with a fixed 2-D sin-cos position embedding and MoCo v3's
initialisation (`init_vit_as_mocov3`).
"""
import copy
import math

import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from loss import FORMS, snclr_loss
from memory_queue import MemoryQueue
from positiveness import Positiveness, option_names

# ViT sizes (layers, heads, width): DeiT-Tiny, and ViT-S/ViT-B as in MoCo v3 (MLP ratio 4).
VITS = {"vit_tiny": (12, 3, 192), "vit_small": (12, 6, 384), "vit_base": (12, 12, 768)}
RESNETS = ("resnet18", "resnet34", "resnet50")
ARCHS = RESNETS + tuple(VITS)
SMALL_IMAGE = 64  # at or below this side length "auto" picks the small-image stem (CIFAR, MNIST)
STEMS = ("auto", "small", "imagenet")


def build_backbone(arch: str, image_size: int = 224, stem: str = "auto") -> tuple[nn.Module, int]:
    """The encoder f: a torchvision ResNet or VisionTransformer without classifier.

    Returns (module, feature dim). stem="small" (the "auto" choice for images <= 64 px): ResNets
    use the CIFAR stem (3x3 stride-1 conv1, no max-pool) and ViTs 4x4 patches, so a 32 px image
    still gives 32x32 maps / 64 tokens. stem="imagenet": torchvision's own (7x7 stride-2 conv +
    max-pool, 16x16 patches); on 28 px images it runs ~10x faster than the small stem on a CPU.
    The classifier (ResNet `fc`, ViT `heads`) is an Identity, so the state dict is
    torchvision's minus the classifier. Initialisation follows MoCo v3: ResNets with
    zero_init_residual=True (each residual branch starts as the identity, Goyal et al. 2017),
    ViTs as in `init_vit_as_mocov3`.
    """
    small = check_image_size(arch, image_size, stem)
    if arch in RESNETS:
        net = getattr(torchvision.models, arch)(zero_init_residual=True)
        if small:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # torchvision's own initialisation of a convolution
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    layers, heads, width = VITS[arch]
    patch = 4 if small else 16
    net = VisionTransformer(image_size, patch, layers, heads, width, 4 * width)
    net.heads = nn.Identity()
    init_vit_as_mocov3(net, patch)
    return net, width


def check_image_size(arch: str, image_size: int, stem: str = "auto") -> bool:
    """Whether the small-image stem is used; a ValueError line for an arch, stem or size the
    backbone cannot take. A ResNet needs 8 px or more: the small stem's three stride-2 stages
    leave one pixel of an 8 px image, and torchvision's 7x7 stride-2 stem sees nothing of a
    smaller one. A ViT needs a size divisible by its patch and at least 2 x 2 patches."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
    small = stem == "small" or (stem == "auto" and image_size <= SMALL_IMAGE)
    patch = 4 if small else 16
    least = 8 if arch in RESNETS else 2 * patch
    if image_size < least:
        raise ValueError(f"image size {image_size} is too small for {arch} with the "
                         f"{'small' if small else 'imagenet'} stem: it needs at least {least} px")
    if arch in VITS and image_size % patch:
        raise ValueError(f"{arch} needs an image size divisible by its patch size {patch}, "
                         f"got {image_size}")
    return small


def sincos_position_embedding(grid: int, width: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding: (1, 1 + grid * grid, width).

    Patch (r, c) of the grid x grid patches (row-major, as ViT orders its tokens) gets, with
    omega_d = temperature^(-d / (width / 4)) for d = 0 .. width/4 - 1,
        [sin(r omega), cos(r omega), sin(c omega), cos(c omega)];
    the class token gets zeros. Not learned (MoCo v3 found no gain in learning it).
    """
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, "
                         f"got {width}")
    d = width // 4
    omega = 1.0 / temperature ** (torch.arange(d, dtype=torch.float64) / d)       # (d,)
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (grid, grid)
    r_om = r.flatten()[:, None] * omega                                           # (grid^2, d)
    c_om = c.flatten()[:, None] * omega                                           # (grid^2, d)
    patches = torch.cat([r_om.sin(), r_om.cos(), c_om.sin(), c_om.cos()], dim=1)  # (grid^2, width)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches])[None].float()


@torch.no_grad()
def init_vit_as_mocov3(net: VisionTransformer, patch: int) -> None:
    """MoCo v3's ViT initialisation, on torchvision's VisionTransformer.

    - position embedding: the fixed 2-D sin-cos one (no gradient);
    - class token N(0, 1e-6);
    - attention in_proj (q, k, v stacked): xavier-uniform per q / k / v block, i.e. bound
      sqrt(6 / (width + width)) (torchvision stacks the three maps MoCo v3 calls qkv);
    - every other Linear xavier-uniform, biases zero;
    - patch embedding xavier-uniform over its flattened fan: bound sqrt(6 / (3 p^2 + width)).
    """
    width = net.hidden_dim
    net.encoder.pos_embedding.copy_(sincos_position_embedding(net.image_size // patch, width))
    net.encoder.pos_embedding.requires_grad_(False)
    nn.init.normal_(net.class_token, std=1e-6)
    for module in net.modules():
        if isinstance(module, nn.MultiheadAttention):
            bound = math.sqrt(6.0 / (width + width))  # each of q, k, v: (width, width)
            nn.init.uniform_(module.in_proj_weight, -bound, bound)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):  # out_proj and the MLPs
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    bound = math.sqrt(6.0 / (3 * patch * patch + width))
    nn.init.uniform_(net.conv_proj.weight, -bound, bound)
    nn.init.zeros_(net.conv_proj.bias)


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: Linear (no bias) + BN + ReLU between layers; optional affine-free last BN."""
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:  # SimCLR's affine-free BN on the output, kept by MoCo v3
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def momentum_schedule(step: int, total_steps: int, base: float = 0.99) -> float:
    """MoCo v3 / BYOL: m rises from `base` to 1 on a half cosine over training.

    m(t) = 1 - (1 - base) * (cos(pi * t / T) + 1) / 2
    """
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it is: the equations never run in bf16 (its cosines are off
    by ~1 %, which moves w and the loss); float64 stays, for the tests' 1e-12 loop checks."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SNCLR(nn.Module):
    """Online branch (f, g, h), momentum branch (f', g'), positiveness and queue C.

    Projector / predictor depths follow MoCo v3: ResNet 2-layer projector and 2-layer
    predictor without last BN; ViT 3-layer projector and 2-layer predictor with last BN.
    positiveness names a rule of positiveness.RULES; positiveness_options are its
    hyperparameters (e.g. positiveness_t for cosine, learn_gamma for attention).
    """

    def __init__(self, arch: str = "resnet50", image_size: int = 224, dim: int = 256,
                 mlp_dim: int = 4096, tau: float = 0.2, num_neighbors: int = 30,
                 queue_size: int = 65536, positiveness: str = "cosine", loss_form: str = "code",
                 threshold: bool = False, stop_grad_patch: bool = False, stem: str = "auto",
                 **positiveness_options):
        super().__init__()
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"temperature tau must be a finite number > 0, got {tau}")
        if not 0 <= num_neighbors <= queue_size:
            raise ValueError(f"num_neighbors K={num_neighbors} must be in [0, queue_size="
                             f"{queue_size}]: the neighbors are searched in the queue")
        if loss_form not in FORMS:
            raise ValueError(f"unknown loss form {loss_form!r}; choose one of {FORMS}")
        self.tau, self.num_neighbors, self.loss_form = tau, num_neighbors, loss_form
        vit = arch in VITS
        self.backbone, feat_dim = build_backbone(arch, image_size, stem)             # f
        self.projector = build_mlp(3 if vit else 2, feat_dim, mlp_dim, dim)          # g
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)                # h
        if vit and stop_grad_patch:  # MoCo v3: a frozen random patch embedding stabilises ViTs
            self.backbone.conv_proj.requires_grad_(False)
        self.momentum_backbone = copy.deepcopy(self.backbone)                        # f'
        self.momentum_projector = copy.deepcopy(self.projector)                      # g'
        for p in self.momentum_parameters():
            p.requires_grad_(False)
        self.positiveness = Positiveness(dim, positiveness, threshold,               # Eq. 4
                                         **positiveness_options)
        self.queue = MemoryQueue(queue_size, dim)                                    # C, Eq. 3

    def online_parameters(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def momentum_parameters(self):
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def momentum_keys(self, x: torch.Tensor) -> torch.Tensor:
        """k = g'(f'(x)): images (B, 3, H, W) -> keys (B, D) in at least float32, no gradient."""
        # k = g'(f'(x)): the momentum branch has no predictor
        return at_least_float32(self.momentum_projector(self.momentum_backbone(x)))

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """EMA of f, g into f', g' (MoCo, BYOL): theta' <- m theta' + (1 - m) theta, as theta' +
        (1 - m) (theta - theta') in one fused lerp (a frozen tensor stays bit-identical)."""
        torch._foreach_lerp_(self.momentum_parameters(), self.online_parameters(), 1.0 - m)

    def neighbors_ready(self) -> int:
        """K if the queue already holds K keys, else 0 (then the loss is plain Eq. 1)."""
        return self.num_neighbors if len(self.queue) >= self.num_neighbors else 0

    def forward(self, x1, x2, k1, k2, n1, n2, rank: int = 0):
        """Eq. 4 and Eq. 2 for both views, 2 tau (L(z1; k2, NN(k2), w1) + L(z2; k1, NN(k1), w2)),
        from this rank's views x1, x2 (B, 3, H, W), the gathered keys k1, k2 (N, D) and their
        neighbors n1 = NN(k1), n2 = NN(k2) (N, K, D). Returns (loss, w (2B, K) detached: w1's
        rows, then w2's). 2 tau is MoCo v3's: it keeps the gradient scale independent of tau."""
        B = x1.shape[0]
        self.check_gathered(B, k1, n1, rank)
        self.check_gathered(B, k2, n2, rank)
        own = slice(rank * B, (rank + 1) * B)                   # this rank's rows of the gathers
        # y = g(f(x)), z = h(y)
        y1, y2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (B, D)
        z1, z2 = self.predictor(y1), self.predictor(y2)                                # (B, D)
        with torch.autocast(x1.device.type, enabled=False):   # the equations in >= float32
            y1, y2, z1, z2, k1, k2, n1, n2 = map(at_least_float32, (y1, y2, z1, z2, k1, k2, n1, n2))
            # Eq. 4: w1_bi = softmax_i(y1_b . NN(k2_b)_i), w2 likewise with y2 and NN(k1)
            w1, w2 = self.positiveness(y1, n2[own]), self.positiveness(y2, n1[own])  # (B, K)
            # Eq. 2, both views: 2 tau ( L(z1; k2, NN(k2), w1) + L(z2; k1, NN(k1), w2) )
            loss = 2 * self.tau * (snclr_loss(z1, k2, n2, w1, self.tau, rank, self.loss_form)
                                   + snclr_loss(z2, k1, n1, w2, self.tau, rank, self.loss_form))
        return loss, torch.cat([w1, w2]).detach()

    def check_gathered(self, B: int, keys: torch.Tensor, neighbors: torch.Tensor, rank: int):
        """forward's gathered inputs: keys (N, D), neighbors (N, K, D), this rank's rows in N."""
        N, D = keys.shape[0], self.queue.dim
        if keys.shape != (N, D) or neighbors.shape[::2] != (N, D) or not 0 <= rank < N // B:
            raise ValueError(f"expected keys (N, D={D}) and neighbors (N, K, D) with rows "
                             f"[{rank * B}, {(rank + 1) * B}) of rank {rank} inside N, got keys "
                             f"{tuple(keys.shape)}, neighbors {tuple(neighbors.shape)}")


def build_model(a: dict) -> SNCLR:
    """The SNCLR model a run's options describe (a dict, as stored in args.json and checkpoints).

    A positiveness option missing from an older checkpoint takes its default (a run that
    predates an option never used it).
    """
    options = {name: a[name] for name in option_names() if name in a}
    return SNCLR(a["arch"], a["image_size"], a["dim"], a["mlp_dim"], a["tau"], a["num_neighbors"],
                 a["queue_size"], a["positiveness"], a["loss_form"], a["threshold"],
                 a["stop_grad_patch"], a["stem"], **options)
