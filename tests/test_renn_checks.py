"""ReNN and the rule losses check their settings when built or in the preflight (`zoo.cli.preflight.preflight`, which
`train.py fit` runs before it moves an earlier run to stale/), not at the first forward or at setup: rules over
patterns the model does not detect, a SemanticLoss constraint of another width, a colour rule of another world,
model patterns the data does not annotate. `rules: []` is the ablation of the rule map. The data-efficiency benchmark
checks every model's run before the first trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from datamodules import RuleSeriesDataModule
from datamodules._base import DataSettingError
from losses.renn import LogicRuleDistillation, PartsWorldColourRule, ReNNLoss, SemanticLoss
from zoo.cli.errors import is_configuration_error
from zoo.cli.preflight import preflight
from zoo.renn.model import Pattern, Within


def test_rules_over_patterns_the_model_does_not_detect_are_refused_when_built() -> None:
    """They raised a KeyError at the first forward (the fit's sanity check, after the run folder moved)."""
    with pytest.raises(ValueError, match=r"rule 'premature_then_pause' uses \['premature_beat'\].*the model's "
                                         r"pattern_names are \['normal_beat'\]"):
        zoo.create_model("renn_series", pattern_names=["normal_beat"])
    from zoo.renn.model import rule_patterns

    nested = Within(Pattern("a") & ~Pattern("b"), within=(1, 3)) | Pattern("a")
    assert rule_patterns(nested) == ["a", "b"]
    with pytest.raises(ValueError, match=r"uses \['b'\]"):
        zoo.create_model("renn_series", pattern_names=["a"], rules=[nested])


def test_no_rules_is_the_ablation_of_the_rule_map() -> None:
    """`rules: []` (does the rule map help?) died with "stack expects a non-empty TensorList" at the first forward:
    the rule map is (B, 0, T), the head reads the patterns alone, and the model still explains itself."""
    model = zoo.create_model("renn_series", rules=[]).eval()
    series = torch.randn(3, 1, 64)
    out = model(series)
    assert out["rule_map"].shape == (3, 0, 64) and out["logits"].shape == (3, 4)
    assert model.rule_names == [] and set(model.explain(out)[0]) == {"normal_beat", "premature_beat"}
    own = zoo.explain(model, series, "own")  # the strongest pattern detection, for want of rules
    torch.testing.assert_close(own, out["patterns"].amax(1))
    out["logits"].sum().backward()
    ruled = zoo.create_model("renn_series").eval()  # with rules: the strongest rule activation, as before
    torch.testing.assert_close(zoo.explain(ruled, series, "own"), ruled(series)["rule_map"].amax(1).detach())


def test_a_semantic_constraint_of_another_width_is_refused_when_built() -> None:
    """Rows of 4 for 6 classes failed at the sanity check with a traceback."""
    from zoo.renn.system import RuleLossSystem

    with pytest.raises(ValueError, match=r"constraint has rows of 4 entries, but the model has num_classes=6"):
        RuleLossSystem(model_name="baseline_tinycnn", num_classes=6,
                       loss=SemanticLoss(constraint=[[1, 0, 0, 0], [0, 1, 0, 0]]))
    RuleLossSystem(model_name="baseline_tinycnn", num_classes=4, loss=SemanticLoss(constraint=[[1, 0, 0, 0]]))


def test_the_preflight_refuses_a_colour_rule_of_another_world() -> None:
    """`bind_data` ran only at setup, after the move, with a traceback: the preflight's data check runs it now."""
    from datamodules import PartsWorldDataModule
    from zoo.renn.system import RuleLossSystem

    data = PartsWorldDataModule(num_classes=6, image_size=64, num_train=8, num_val=8, num_test=8, batch_size=8)
    system = RuleLossSystem(model_name="baseline_tinycnn", num_classes=6,
                            loss=LogicRuleDistillation(rules=[PartsWorldColourRule(num_classes=4)]))
    with pytest.raises(DataSettingError, match=r"num_classes=4 \(the data's num_classes=6\)") as caught:
        preflight(system, datamodule=data)
    assert is_configuration_error(caught.value)  # said once, without a traceback


def _renn_system(data: Any, **model_kwargs: Any) -> Any:
    from zoo.renn.system import ReNNSystem

    return ReNNSystem(model_name="renn_series", num_classes=4, in_chans=None, image_size=None,
                      data_inputs=data.model_inputs, input_key="series", loss=ReNNLoss(), model_kwargs=model_kwargs)


def test_the_preflight_refuses_patterns_the_data_does_not_annotate() -> None:
    """A model pattern the data has no annotation row for was refused only at setup, after the move."""
    data = RuleSeriesDataModule(num_train=8, num_val=8, num_test=8, length=128, batch_size=8)
    with pytest.raises(DataSettingError, match=r"\['pvc'\] that the data .*does not annotate"):
        preflight(_renn_system(data, pattern_names=["normal_beat", "pvc"], rules=[]), datamodule=data)
    preflight(_renn_system(data), datamodule=data)


def test_data_efficiency_checks_every_model_before_any_trains(monkeypatch: pytest.MonkeyPatch,
                                                              in_tmp_dir: Path) -> None:
    """A ReNN-only override (its stage schedule) failed the baselines after ReNN's points had trained."""
    import benchmarks.renn_data_efficiency as benchmark

    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a point trained before every model was checked")

    monkeypatch.setattr(benchmark, "run_grid_point", no_training)
    stages = "--model.init_args.stages=[{name: local, epochs: 1, train: [detector], losses: [loss_local]}]"
    with pytest.raises(ValueError, match=r"(?s)cnn \(baselines/rule_series_cnn.yaml\): .*trains \['detector'\]") \
            as caught:
        benchmark.main(["--fractions", "1.0", "--seeds", "0", "--name", "de", "--data.init_args.num_train=8",
                        "--data.init_args.num_val=8", stages])
    assert is_configuration_error(caught.value)
