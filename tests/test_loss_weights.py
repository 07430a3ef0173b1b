"""Loss weights that would train another objective are refused when the loss is built: a negative lambda (CBM's
`weight=-5` pushed the concept head away from the labels and finished as a normal run), a NaN or infinite one (a
FloatingPointError at the first step, after `fit` had moved the earlier run to stale/), a positive ProtoPNet
separation (the paper's -0.08 pushes other classes' prototypes away), shares outside [0, 1]. 0 stays valid: the
opaque twins and ablations turn a term off with it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from losses.baselines import ClassificationLoss
from losses.cbm import ConceptBottleneckLoss
from losses.icnn import FilterPartLoss
from losses.l2x import INVASELoss
from losses.protopnet import ProtoPNetLoss
from losses.renn import LogicRuleDistillation, ReNNLoss, SemanticLoss
from losses.textual import DiscriminativeLoss, RelevanceLoss, TextualLoss
from tests.conftest import REPO
from tests.test_compare_ablate import said_once


def distillation(**kwargs: Any) -> LogicRuleDistillation:
    return LogicRuleDistillation(rules=[lambda batch, out: None], **kwargs)


# (build, argument): every weight-like argument of every loss, each >= 0 (0 turns its term off)
WEIGHTS: list[tuple[Callable[..., Any], str]] = [
    (ClassificationLoss, "weight"), (ConceptBottleneckLoss, "weight"), (FilterPartLoss, "weight"),
    (INVASELoss, "sparsity"), (ProtoPNetLoss, "cluster"), (ProtoPNetLoss, "l1"), (ReNNLoss, "local_weight"),
    (ReNNLoss, "pos_weight"), (SemanticLoss, "weight"), (distillation, "weight"), (distillation, "strength"),
    (RelevanceLoss, "weight"), (DiscriminativeLoss, "weight"), (TextualLoss, "relevance_weight"),
    (TextualLoss, "discriminative_weight"),
]
FRACTIONS = [(ClassificationLoss, "label_smoothing"), (distillation, "pi_max"), (distillation, "decay"),
             (DiscriminativeLoss, "momentum")]


def owner(build: Callable[..., Any]) -> str:
    return "LogicRuleDistillation" if build is distillation else build.__name__


@pytest.mark.parametrize("build, name", WEIGHTS, ids=[f"{owner(b)}.{n}" for b, n in WEIGHTS])
@pytest.mark.parametrize("value", [-5, -1e-3, math.nan, math.inf, -math.inf])
def test_a_negative_or_non_finite_weight_is_refused_by_name(build: Callable[..., Any], name: str, value: float
                                                            ) -> None:
    with pytest.raises(ValueError) as error:
        build(**{name: value})
    message = str(error.value)
    assert message.startswith(f"{owner(build)} {name}={value!r}: "), message
    assert ("a negative weight maximises" if value < 0 and math.isfinite(value) else "NaN or infinite") in message


@pytest.mark.parametrize("build, name", WEIGHTS, ids=[f"{owner(b)}.{n}" for b, n in WEIGHTS])
def test_zero_and_positive_weights_stay_valid(build: Callable[..., Any], name: str) -> None:
    """0 is the opaque twins' and ablations' way to turn a term off; a positive int from YAML is a weight too."""
    build(**{name: 0})
    build(**{name: 1})


def test_protopnet_separation_is_negative_by_design() -> None:
    """The paper's lambda_sep = -0.08 (Sep pushed up) and 0 are valid; a positive one pulls other classes'
    prototypes closer, and is refused."""
    assert ProtoPNetLoss(separation=-0.08).separation == -0.08 and ProtoPNetLoss(separation=0).separation == 0
    for value in (0.08, math.nan, -math.inf):
        with pytest.raises(ValueError, match=rf"ProtoPNetLoss separation={value!r}: .*<= 0"):
            ProtoPNetLoss(separation=value)


@pytest.mark.parametrize("build, name", FRACTIONS, ids=[f"{owner(b)}.{n}" for b, n in FRACTIONS])
def test_shares_outside_zero_to_one_are_refused(build: Callable[..., Any], name: str) -> None:
    for value in (0, 1, 0.5):
        build(**{name: value})
    for value in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=rf"^{owner(build)} {name}={value!r}: .*must be a number in \[0, 1\]"):
            build(**{name: value})


def test_per_item_weights_name_their_index() -> None:
    with pytest.raises(ValueError, match=r"ConceptBottleneckLoss pos_weight\[1\]=-2.0: "):
        ConceptBottleneckLoss(pos_weight=[1.0, -2.0])
    with pytest.raises(ValueError, match=r"LogicRuleDistillation rule_weights\[0\]=nan: "):
        LogicRuleDistillation(rules=[lambda batch, out: None], rule_weights=[math.nan])


def test_distillation_never_weighs_the_task_term_negatively() -> None:
    """pi_t = weight * min(pi_max, 1 - decay^t) and the task term gets 1 - pi_t: weight 2 with pi_max 0.95 would
    maximise the task cross-entropy."""
    distillation(weight=1.0, pi_max=1.0)
    with pytest.raises(ValueError, match=r"weight \* pi_max = 1.9 > 1"):
        distillation(weight=2.0, pi_max=0.95)


def test_fit_refuses_a_negative_weight_before_the_earlier_run_is_moved(in_tmp_dir: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`fit --config configs/cbm/parts_world.yaml --model.init_args.loss.init_args.weight=-5` trained the concept
    head away from the labels: now one line, exit status 2, and the earlier run stays where it was."""
    run = in_tmp_dir / "checkpoints" / "cbm_parts_world"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {}\n")
    error = said_once(capsys, ["fit", "--config", str(REPO / "configs/cbm/parts_world.yaml"),
                               "--model.init_args.loss.init_args.weight=-5", "--data.init_args.num_train=32",
                               "--data.init_args.num_val=16", "--trainer.max_epochs=1"])
    line = error.splitlines()[0]  # the message; then only the JSONARGPARSE_DEBUG tip
    assert line.startswith("train.py: error: ConceptBottleneckLoss weight=-5.0: ") and len(error.splitlines()) == 2
    assert "a negative weight maximises the concept BCE" in line, error
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"], error
    assert not (run.parent / "stale").exists(), error


def test_per_item_weights_computed_as_tensors_or_arrays_are_taken() -> None:
    """A per-concept pos_weight computed from the data's class balance is a tensor or an array: taken as a list is
    (it was refused as one "non-finite" number), a bad entry named by its index; a 0-d tensor is a number."""
    import numpy as np

    ratio = (1 - torch.full((36,), 0.2)) / 0.2  # (K,) negatives per positive
    for pos_weight in (ratio, ratio.numpy(), ratio.tolist()):
        loss = ConceptBottleneckLoss(pos_weight=pos_weight)
        assert torch.equal(loss.pos_weight, ratio) and loss.pos_weight.data_ptr() != ratio.data_ptr()
    bad = ratio.clone()
    bad[3] = -1.0
    with pytest.raises(ValueError, match=r"ConceptBottleneckLoss pos_weight\[3\]=-1.0"):
        ConceptBottleneckLoss(pos_weight=bad)
    assert ReNNLoss(pos_weight=torch.tensor(4.0)).pos_weight.item() == 4.0
    assert ReNNLoss(pos_weight=np.float64(4.0)).pos_weight.item() == 4.0
    assert ConceptBottleneckLoss(weight=torch.tensor(0.5)).weight == torch.tensor(0.5)


def test_a_per_pattern_list_is_refused_where_the_loss_takes_one_number() -> None:
    """ReNNLoss's pos_weight is one number: a list of one per pattern broadcast over the time steps (a size error
    at the first step, or, with as many steps as patterns, time steps weighted silently)."""
    with pytest.raises(ValueError, match=r"ReNNLoss pos_weight=\[1.0, 10.0, 100.0\]"):
        ReNNLoss(pos_weight=[1.0, 10.0, 100.0])
