# %% [markdown]
# # One SNCLR step, quantity by quantity
# Eight images, a tiny SNCLR on the CPU, a queue filled with other images' keys; then each
# quantity of one training step in the order the step computes it (Eq. 3, Eq. 4, Eq. 2, and
# Eq. 1 as Eq. 2 at K = 0), each checked against a plain loop as it is printed.
# Runs as a script (`python walkthrough.py`, a few seconds) or cell by cell in Jupyter / VS Code.

# %%
import math
import os

import torch
import torchvision

from images.datasets import FASHION_MNIST_DEB, FashionMNIST, two_view_transforms
from loss import candidate_log_probs, info_nce, snclr_loss
from model import SNCLR

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)
B, K, TAU, SIZE = 8, 3, 0.2, 28      # batch, neighbors (Eq. 3), temperature, image side


def cos(a, b):                       # the plain-loop references below use Python floats
    a, b = a.detach(), b.detach()
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def check(name, got, expected, tol=1e-5, ref="loop"):
    assert abs(got - expected) <= tol * max(1.0, abs(expected)), (name, got, expected)
    print(f"  {name}: {got:.6f}  ({ref}: {expected:.6f})")


# %% [markdown]
# ## The images and their two augmented views (BYOL / MoCo v3 asymmetric pair)

# %%
if os.path.isdir(FASHION_MNIST_DEB):
    images = FashionMNIST(FASHION_MNIST_DEB, train=False)  # the 10k test split: quick to read
else:  # any machine: random pictures with the same shapes
    images = torchvision.datasets.FakeData(64, (3, SIZE, SIZE), 10, random_offset=0)
view1, view2 = two_view_transforms("fashion-mnist", SIZE, crop_min=0.2)
x1 = torch.stack([view1(images[i][0].convert("RGB")) for i in range(B)])   # (B, 3, 28, 28)
x2 = torch.stack([view2(images[i][0].convert("RGB")) for i in range(B)])
print("views:", tuple(x1.shape), "labels:", [images[i][1] for i in range(B)])

# %% [markdown]
# ## A tiny model; the queue C filled with the momentum keys of 24 other images

# %%
model = SNCLR("resnet18", SIZE, dim=16, mlp_dim=32, tau=TAU, num_neighbors=K, queue_size=64)
others = torch.stack([view1(images[i][0].convert("RGB")) for i in range(B, B + 24)])
model.queue.enqueue(model.momentum_keys(others))
C = model.queue.features[:len(model.queue)]                                # (24, D), unit rows
print("queue holds", len(model.queue), "keys")

# %% [markdown]
# ## Momentum keys k = g'(f'(x)), no gradient, no predictor

# %%
k1, k2 = model.momentum_keys(x1), model.momentum_keys(x2)                  # (B, D)
print("k2[0] =", k2[0])

# %% [markdown]
# ## Eq. 3: NN(k) = the K entries of C with the largest cosine to k

# %%
idx2 = model.queue.nearest_indices(k2, K)                                  # (B, K)
for b in range(B):
    loop = sorted(range(C.shape[0]), key=lambda j: -cos(k2[b], C[j]))[:K]
    assert idx2[b].tolist() == loop, (b, idx2[b], loop)
print(f"Eq. 3: NN(k2[b]) for all {B} rows equals the loop's sort of C by cosine")
print("  NN(k2[0]) rows:", idx2[0].tolist(),
      "cosines:", [round(cos(k2[0], C[j]), 3) for j in idx2[0]])
idx1 = model.queue.nearest_indices(k1, K)
n1, n2 = C[idx1], C[idx2]                                                  # (B, K, D)

# %% [markdown]
# ## Eq. 4: positiveness w_bi = softmax_i(cos(y1_b, n_bi)), n_bi = NN(k2_b)_i (the released
# rule), with y = g(f(x)) the online projector output

# %%
y1 = model.projector(model.backbone(x1))                                   # (B, D)
z1 = model.predictor(y1)                                                   # (B, D) queries
w1 = model.positiveness(y1, n2)                                            # (B, K)
print("Eq. 4: w1[0] =", w1[0].detach(), "(each row sums to 1)")
for b in range(B):                   # every row against the loop; row 0 printed
    e = [math.exp(cos(y1[b], n2[b, i])) for i in range(K)]
    for i in range(K):
        if b == 0:
            check(f"w1[0, {i}]", w1[0, i].item(), e[i] / sum(e))
        assert abs(w1[b, i].item() - e[i] / sum(e)) < 1e-5, (b, i)

# %% [markdown]
# ## Eq. 2: the candidates are every key with its neighbors, N (K + 1) of them;
# p_b = softmax of z1_b . c / tau. Row b's own key is candidate (b*, 0), its neighbors (b*, i).

# %%
log_p = candidate_log_probs(z1, k2, n2, TAU)                               # (B, K + 1)
cands = [[k2[j]] + [n2[j, i] for i in range(K)] for j in range(B)]
expo = [[math.exp(cos(z1[0], c) / TAU) for c in row] for row in cands]
p0 = [v / sum(map(sum, expo)) for v in expo[0]]                            # row 0's own candidates
print("Eq. 2: p_b(b*, i), row 0")
for i in range(K + 1):
    check(f"p_0(0*, {i})", log_p[0, i].exp().item(), p0[i], tol=1e-4)


def loop_loss(form):
    total = 0.0
    for b in range(B):
        e = [[math.exp(cos(z1[b], c) / TAU) for c in row] for row in cands]
        p = [v / sum(map(sum, e)) for v in e[b]]
        w = w1[b].tolist()
        if form == "paper":
            total += -math.log(p[0] + sum(w[i] * p[i + 1] for i in range(K)))
        else:
            total += -(math.log(p[0]) + sum(w[i] * math.log(p[i + 1]) for i in range(K)))
    return total / B


for form in ("code", "paper"):
    got = snclr_loss(z1, k2, n2, w1, TAU, form=form).item()
    check(f"Eq. 2 ({form} form)", got, loop_loss(form))

# %% [markdown]
# ## Eq. 1, InfoNCE over the keys alone: Eq. 2 with K = 0

# %%
e1 = [[math.exp(cos(z1[b], k2[j]) / TAU) for j in range(B)] for b in range(B)]
loop_eq1 = sum(-math.log(r[b] / sum(r)) for b, r in enumerate(e1)) / B
check("Eq. 1 (InfoNCE)", info_nce(z1, k2, TAU).item(), loop_eq1)
no_neighbors = snclr_loss(z1, k2, n2[:, :0], w1[:, :0], TAU).item()
check("Eq. 1 = Eq. 2 at K = 0", no_neighbors, loop_eq1)

# %% [markdown]
# ## The symmetric loss 2 tau (L(z1; k2) + L(z2; k1)) as the model computes it, then the
# step's state changes: backward, EMA of f, g into f', g', and C <- k2 (FIFO)

# %%
loss, w = model(x1, x2, k1, k2, n1, n2)
y2 = model.projector(model.backbone(x2))
by_hand = 2 * TAU * (snclr_loss(z1, k2, n2, w1, TAU)
                     + snclr_loss(model.predictor(y2), k1, n1, model.positiveness(y2, n1), TAU))
check("symmetric loss", loss.item(), by_hand.item(), ref="from the parts")
loss.backward()
torch.optim.SGD(model.parameters(), lr=0.1).step()
model.momentum_update(0.99)
model.queue.enqueue(k2)
print("after the step: queue holds", len(model.queue), "keys; w (2B, K):", tuple(w.shape))
