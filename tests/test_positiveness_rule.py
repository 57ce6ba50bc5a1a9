"""A new positiveness rule is one function in one file: registered here, it is a choice of
--positiveness, its hyperparameter a flag of train.py, and a run trains, saves and resumes with
it, with no edit to model.py, runtime/options.py or anything else."""
import json

import pytest
import torch

import positiveness
import train
from positiveness import RULES, Option, register
from runtime.checkpoint import read_log
from conftest import SMOKE, fails_in_process


@pytest.fixture
def rank_rule():
    """The rule docs/running.md shows, registered for one test and removed after it."""
    seen = []

    @register("rank", "w_bi = softmax_i(-i / s): the nearer the neighbor, the more it counts",
              options={"positiveness_s": Option(1.0, "rank scale s of --positiveness rank")})
    def rank_positiveness(y, neighbors, positiveness_s=1.0):
        """w_bi = softmax_i(-i / s): y (B, D), neighbors (B, K, D) -> w (B, K), nearest first."""
        B, K = neighbors.shape[:2]
        ranks = torch.arange(K, dtype=y.dtype, device=y.device)
        # w_bi = softmax_i( -i / s )
        w = (-ranks / positiveness_s).softmax(dim=0).expand(B, K)
        seen.append(w.detach().clone())
        return w

    yield seen
    del RULES["rank"]


def test_a_registered_rule_trains_resumes_and_is_refused_with_the_wrong_options(rank_rule, tmp_path, capsys):
    assert "rank" in train.options.get_args_parser().format_help()
    out = tmp_path / "run"
    run = SMOKE + ["--positiveness", "rank", "--positiveness-s", "0.5", "--knn-every", "0",
                   "--output-dir", str(out)]
    train.main(run + ["--epochs", "1"])
    expected = torch.tensor([0.0, -2.0]).softmax(0)                   # K = 2, s = 0.5
    full = [w for w in rank_rule if w.shape[1] == 2]                  # (the first step: C empty, K = 0)
    assert full and all(torch.allclose(w, expected.expand_as(w)) for w in full)
    saved = json.loads((out / "args.json").read_text())
    assert (saved["positiveness"], saved["positiveness_s"]) == ("rank", 0.5)
    steps = len(rank_rule)
    train.main(run + ["--epochs", "2"])                               # a resume builds the same rule
    assert len(rank_rule) == 2 * steps and [e["epoch"] for e in read_log(out / "log.txt")][-1] == 2
    line = fails_in_process(capsys, train.main, SMOKE + ["--positiveness-s", "0.5", "--output-dir",
                                                         str(tmp_path / "other")])
    assert "--positiveness-s applies to --positiveness rank, not cosine" in line
    fails_in_process(capsys, train.main, SMOKE + ["--positiveness", "rank", "--positiveness-s", "0"])


def test_a_rule_or_option_registered_twice_is_refused(rank_rule):
    with pytest.raises(ValueError, match="'rank' or its options"):
        register("rank", "again")(lambda y, neighbors: y)
    with pytest.raises(ValueError, match=r"\['positiveness_s'\] are already registered"):
        register("rank2", "same option", options={"positiveness_s": Option(2.0, "")})(lambda y, n: y)
    assert "rank2" not in RULES and positiveness.option_names().count("positiveness_s") == 1
