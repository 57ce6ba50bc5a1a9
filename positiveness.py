"""Positiveness w: how much each candidate neighbor counts as a positive (paper Sec. 3.2, Eq. 4).

"Soft" neighbors: a neighbor is neither a full positive (w = 1, as in NNCLR) nor a negative
(w = 0, as in MoCo); it counts as a positive with a weight w in [0, 1] in the loss (Eq. 2).

For local sample b with online projector output y_1b and its other view's K neighbors
n_bi = NN(k_2b)_i in the queue C (Eq. 3), with ^v = v / ||v||:

    w_bi = softmax_i( f1(^y_1b) . f2(^n_bi) )                                     (Eq. 4)

The paper calls this a cross-attention with learnable f1, f2 and a scaling factor gamma; the
released code has no parameters (f1 = f2 = identity after normalising). Each reading is a
*rule* in RULES, chosen with `--positiveness`:

  rule        w_bi                                              learned         gradient into y
  cosine      softmax_i cos(y_1b, n_bi) / t  (released: t = 1)  none            yes
  attention   softmax_i gamma f1(^y_1b) . f2(^n_bi)             f1, f2 (gamma)  yes
  hard        1  (every neighbor a full positive)               none            no
  none        0  (neighbors only as extra negatives)            none            no

Cosines lie in [-1, 1], so the released rule keeps w within a factor e^2 of uniform: in the
README's Fashion-MNIST demo (K = 5) same-class neighbors got a mean w of 0.201, other-class
ones 0.199. A temperature t < 1 sharpens it; so does a learned gamma for attention. w is never
detached: as released, the loss gradient flows through w into y.

A new rule is one function here, registered with its help line and hyperparameters:
`--positiveness` lists it and each hyperparameter becomes a flag of train.py, with no edit
anywhere else (docs/running.md shows one in ten lines).
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Option:
    """A rule's hyperparameter. A bool default makes an on/off flag; a float default a number
    that must be finite and > 0 (a temperature or a scale). Its name is the train.py flag with
    '_' for '-' (positiveness_t: --positiveness-t) and the key in args.json."""
    default: float | bool
    help: str


@dataclass(frozen=True)
class Rule:
    """weigh(y, neighbors, **options, **learned) -> w (B, K); learned(dim, **options) makes the
    rule's parameters (modules or tensors) once; figures(**learned) -> what an epoch logs."""
    weigh: Callable
    help: str
    options: dict = field(default_factory=dict)
    learned: Callable = None
    figures: Callable = None


RULES: dict[str, Rule] = {}


def register(name: str, help: str, options: dict = None, learned=None, figures=None):
    """Decorator: add weigh(y, neighbors, ...) -> w (B, K) to RULES under `name`."""
    def add(weigh):
        taken = {o: r for r, rule in RULES.items() for o in rule.options}
        clash = [o for o in options or {} if o in taken]
        if name in RULES or clash:
            raise ValueError(f"positiveness rule {name!r} or its options {clash} are already "
                             f"registered")
        RULES[name] = Rule(weigh, help, dict(options or {}), learned, figures)
        return weigh
    return add


def option_names() -> list[str]:
    """Every rule's hyperparameters: the names train.py takes as flags and build_model passes on."""
    return [name for rule in RULES.values() for name in rule.options]


def check_options(rule: str, given: dict) -> dict:
    """The rule's options with their defaults filled in; one ValueError line for an unknown rule,
    an option of another rule set away from its default, or a value out of range."""
    if rule not in RULES:
        raise ValueError(f"unknown positiveness rule {rule!r}; choose one of {tuple(RULES)}")
    owners = {o: (r, spec) for r, entry in RULES.items() for o, spec in entry.options.items()}
    for name, value in given.items():
        if name not in owners:
            raise ValueError(f"unknown positiveness option {name!r}; the rules take "
                             f"{option_names()}")
        owner, spec = owners[name]
        flag = "--" + name.replace("_", "-")
        if owner != rule and value != spec.default:
            raise ValueError(f"{flag} applies to --positiveness {owner}, not {rule}")
        if not isinstance(spec.default, bool) and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    return {name: given.get(name, spec.default) for name, spec in RULES[rule].options.items()}


# ------------------------------------------------------------------------------- the rules ---
@register("cosine", "released code: softmax of cosines (no parameters)",
          options={"positiveness_t": Option(1.0, "temperature t: w = softmax(cos / t); "
                                                 "1 is the released code, smaller is sharper")})
def cosine_positiveness(y: torch.Tensor, neighbors: torch.Tensor,
                        positiveness_t: float = 1.0) -> torch.Tensor:
    """Eq. 4 as released, with a temperature t: w_bi = softmax_i( cos(y_b, n_bi) / t ).

    y (B, D), neighbors (B, K, D) -> w (B, K); each row sums to 1 (empty when K = 0).
    """
    # w_bi = softmax_i( ^y_b . ^n_bi / t )
    cos = torch.einsum("bd,bkd->bk", F.normalize(y, dim=-1), F.normalize(neighbors, dim=-1))
    return (cos / positiveness_t).softmax(dim=1)


def attention_parameters(dim: int, learn_gamma: bool = False) -> dict:
    """f1, f2 start at the identity and gamma at 1, so an untrained attention rule computes the
    released cosine rule exactly. gamma = exp(log_gamma) when learned: the log keeps gamma > 0."""
    f1, f2 = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
    nn.init.eye_(f1.weight)
    nn.init.eye_(f2.weight)
    return {"f1": f1, "f2": f2, "log_gamma": nn.Parameter(torch.zeros(())) if learn_gamma else None}


def attention_figures(log_gamma: torch.Tensor = None, **_) -> dict:
    """What an epoch logs: the learned gamma, when it is learned."""
    return {} if log_gamma is None else {"gamma": log_gamma.detach().exp()}


@register("attention", "paper text: cross-attention with learnable f1, f2 (identity at start)",
          options={"learn_gamma": Option(False, "learn the paper's scaling factor gamma (log-"
                                                "parameterised, starts at 1; logged as 'gamma')")},
          learned=attention_parameters, figures=attention_figures)
def attention_positiveness(y: torch.Tensor, neighbors: torch.Tensor, f1: nn.Linear,
                           f2: nn.Linear, log_gamma: torch.Tensor = None,
                           learn_gamma: bool = False) -> torch.Tensor:
    """Eq. 4 as printed: w_bi = softmax_i( gamma f1(^y_b) . f2(^n_bi) ).

    y (B, D), neighbors (B, K, D) -> w (B, K); f1, f2 linear maps D -> D; gamma = exp(log_gamma),
    or 1 when log_gamma is None (learn_gamma, the option that made log_gamma, is not read here).
    """
    gamma = 1.0 if log_gamma is None else log_gamma.exp()
    # w_bi = softmax_i( gamma f1(^y_b) . f2(^n_bi) )
    f1_y, f2_n = f1(F.normalize(y, dim=-1)), f2(F.normalize(neighbors, dim=-1))  # (B, D), (B, K, D)
    return (gamma * torch.einsum("bd,bkd->bk", f1_y, f2_n)).softmax(dim=1)


@register("hard", "ablation: every neighbor a full positive (w = 1)")
def hard_positiveness(y: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """w_bi = 1: y (B, D), neighbors (B, K, D) -> w (B, K), no gradient."""
    return y.new_ones(neighbors.shape[:2])


@register("none", "ablation: neighbors only as extra negatives (w = 0)")
def no_positiveness(y: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """w_bi = 0: y (B, D), neighbors (B, K, D) -> w (B, K), no gradient."""
    return y.new_zeros(neighbors.shape[:2])


# ------------------------------------------------------------------------------ the module ---
class Positiveness(nn.Module):
    """Eq. 4 by the chosen rule: w (B, K) from y (B, D) and neighbors (B, K, D).

    options: the rule's hyperparameters (Option); the other rules' stay at their defaults.
    threshold=True applies the released code's optional rule: weights below 1/K are set to 0
    (a weight of exactly 1/K is kept; the rest are not renormalised).
    """

    def __init__(self, dim: int, rule: str = "cosine", threshold: bool = False, **options):
        super().__init__()
        self.rule, self.threshold = rule, threshold
        self.options = check_options(rule, options)
        made = RULES[rule].learned(dim, **self.options) if RULES[rule].learned else {}
        for name, value in made.items():
            setattr(self, name, value)  # registered as modules / parameters: trained, checkpointed
        self.learned = tuple(made)

    def forward(self, y: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """Eq. 4: y (B, D) online projector outputs, neighbors (B, K, D) -> w (B, K)."""
        learned = {name: getattr(self, name) for name in self.learned}
        w = RULES[self.rule].weigh(y, neighbors, **self.options, **learned)
        K = neighbors.shape[1]
        if self.threshold and K > 0:
            # released option: w_bi = 0 where w_bi < 1/K
            w = torch.where(w >= 1.0 / K, w, torch.zeros_like(w))
        return w

    def figures(self) -> dict:
        """What the rule's learned parameters show, as floats (e.g. gamma); read once an epoch."""
        figures = RULES[self.rule].figures
        learned = {name: getattr(self, name) for name in self.learned}
        return {k: float(v) for k, v in figures(**learned).items()} if figures else {}
