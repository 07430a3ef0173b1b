"""ReNN: soft-logic predicates against their truth tables, gradients through rules, the rule_series world against
its own rules, staged training that really freezes, rule losses against their closed forms, series files."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import zoo
from datamodules import DatasetLayoutError, RuleSeriesDataModule, SeriesFileDataModule
from datamodules.rule_series import generate
from losses.renn import LogicRuleDistillation, PartsWorldColourRule, SemanticLoss, rule_teacher, semantic_loss
from zoo.renn.metrics import RuleFiring
from tests.conftest import REPO
from zoo.renn.model import (RULE_SERIES_RULES, And, CountAtLeast, FollowedBy, Implies, Not, NotFollowedBy, Or, Pattern,
                             Within, conv_window_sum, get_rule, local_peaks, prefix_window_sum, register_rule,
                             window_sum)


def constant(value: float) -> Pattern:
    return Pattern(f"c{value}")


# ------------------------------------------------------------------------------------------------ soft logic
@pytest.mark.parametrize("a,b", list(itertools.product([0.0, 1.0], repeat=2)))
def test_connectives_match_their_truth_tables(a: float, b: float) -> None:
    patterns = {"a": torch.full((1, 4), a), "b": torch.full((1, 4), b)}
    A, B = Pattern("a"), Pattern("b")
    expected = {"and": a and b, "or": a or b, "not": not a, "implies": (not a) or b}
    for name, rule in {"and": A & B, "or": A | B, "not": ~A, "implies": Implies(A, B)}.items():
        assert torch.equal(rule(patterns), torch.full((1, 4), float(expected[name]))), name
    assert torch.equal(And(A, B, A)(patterns), torch.full((1, 4), float(a and b)))
    assert torch.equal(Or(A, B, Not(B))(patterns), torch.ones(1, 4))


def test_temporal_predicates_on_binary_sequences() -> None:
    a = torch.tensor([[0, 1, 0, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    b = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    patterns = {"a": a, "b": b}
    # b two steps after the first a, none within 3 steps of the second
    def is_binary(values: torch.Tensor, expected: list[int]) -> bool:  # exact up to the 1e-6 clamp of log(1 - p)
        return torch.allclose(values, torch.tensor([expected], dtype=torch.float32), atol=1e-5)

    assert is_binary(FollowedBy(Pattern("a"), Pattern("b"), within=(1, 3))(patterns), [0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert is_binary(NotFollowedBy(Pattern("a"), Pattern("b"), within=(1, 3))(patterns),
                     [0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    # b in the 3 steps before t
    assert is_binary(Within(Pattern("b"), within=(-3, -1))(patterns), [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    for n, truth in ((1, True), (2, True), (3, False)):
        count = CountAtLeast(Pattern("a"), n, sharpness=50.0)(patterns)
        assert torch.allclose(count, torch.full_like(count, float(truth)), atol=1e-6), n
    windowed = CountAtLeast(Pattern("a"), 2, within=(-5, 0), sharpness=50.0)(patterns)
    assert windowed.round().tolist() == [[0, 0, 0, 0, 0, 0, 1, 0, 0, 0]]  # only t = 6 sees both a's in [t-5, t]


@pytest.mark.parametrize("implementation", [prefix_window_sum, conv_window_sum])  # the CPU's, the GPU's
def test_window_sum_matches_a_loop(implementation) -> None:
    torch.manual_seed(0)
    values = torch.rand(3, 17)
    for low, high in ((0, 0), (2, 5), (-4, -1), (-3, 6), (10, 30), (-30, -20), (-20, 40), (-1, 0), (0, 16)):
        expected = torch.stack([values[:, max(0, t + low): max(0, min(17, t + high + 1))].sum(1) for t in range(17)], 1)
        assert torch.allclose(implementation(values, low, high), expected, atol=1e-6), (low, high)
    series = values.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: implementation(v, -3, 6), (series,))
    assert implementation(values[None], -4, -1).shape == (1, 3, 17)  # any leading shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the window sum stays in the values' dtype
        summed = implementation(values, -3, 6)
    assert summed.dtype == torch.float32 and torch.allclose(summed, implementation(values, -3, 6), atol=1e-6)
    if implementation is prefix_window_sum:  # what `window_sum` runs on CPU tensors
        assert torch.equal(window_sum(values, -3, 6), implementation(values, -3, 6))
        with pytest.raises(ValueError, match="empty"):
            window_sum(values, 3, 2)


def test_window_kernel_cached_under_inference_mode_still_trains() -> None:
    """The window kernel is cached per width, device and dtype: a first call under `torch.inference_mode` (as in
    Lightning's validation) must not cache inference tensors that a later training step's backward would save."""
    from zoo.renn.model import _ones_kernel

    _ones_kernel.cache_clear()
    with torch.inference_mode():
        conv_window_sum(torch.rand(2, 23), -2, 5)
    series = torch.rand(2, 23, requires_grad=True)
    conv_window_sum(series, -2, 5).sum().backward()
    assert series.grad is not None and (series.grad > 0).all()


def test_local_peaks_count_a_plateau_once() -> None:
    """Tied maxima in a neighbourhood (a plateau of saturated sigmoids) are one occurrence, kept at the first step."""
    plateau = torch.tensor([[0.0, 0.1, 1.0, 1.0, 0.1, 0.0, 0.0, 0.0]])
    assert local_peaks(plateau).tolist() == [[0, 0, 1, 0, 0, 0, 0, 0]]
    assert local_peaks(torch.ones(2, 3, 9)).sum(-1).tolist() == [[1] * 3] * 2  # any length of plateau, any shape
    ties = torch.tensor([[1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])  # 2 apart: one; 4 apart: another
    assert local_peaks(ties).tolist() == [[1, 0, 0, 0, 0, 0, 1, 0, 0]]
    count = CountAtLeast(Pattern("a"), 2, sharpness=50.0)({"a": plateau})
    assert torch.allclose(count, torch.zeros_like(count), atol=1e-6)  # one beat is not two
    assert CountAtLeast(Pattern("a"), 3, sharpness=50.0)({"a": ties}).max() < 1e-6
    model = zoo.create_model("renn_series")
    patterns = torch.stack([torch.zeros(8), plateau[0]])[None]  # (1, 2, 8): one premature beat over two steps
    assert model.explain({"rule_map": torch.zeros(1, 3, 8), "patterns": patterns})[0]["premature_beat"] == [2]
    # without ties: the neighbourhood maximum, as before, and the gradient flows through the kept steps only
    torch.manual_seed(0)
    p = torch.rand(3, 40, requires_grad=True)
    window = torch.stack([p[:, max(0, t - 2): t + 3].amax(1) for t in range(40)], 1)
    expected = torch.where(p == window, p, torch.zeros_like(p))
    peaks = local_peaks(p)
    assert torch.equal(peaks, expected)
    peaks.sum().backward()
    assert torch.equal(p.grad, (expected > 0).float())


def test_gradients_flow_through_rules() -> None:
    p = torch.full((1, 2, 40), 0.3, requires_grad=True)
    patterns = {"normal_beat": p[:, 0], "premature_beat": p[:, 1]}
    total = sum(get_rule(name)(patterns).sum() for name in RULE_SERIES_RULES)
    total.backward()
    assert p.grad[:, 0].abs().sum() > 0 and p.grad[:, 1].abs().sum() > 0


def test_the_readmes_rule_example_runs_as_written(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The README's ReNN snippet registers a rule of its own (it re-registered two built-in names and failed)."""
    import zoo.renn.model as renn_model
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## ReNN and rule losses"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```", section.index("```python")
                                                                                   + 3)]
    monkeypatch.setattr(renn_model, "_RULES", dict(renn_model._RULES))  # the example's rule stays in this test
    exec(snippet, {})
    assert "isolated_pause" in capsys.readouterr().out
    patterns = {"normal_beat": torch.rand(2, 50), "premature_beat": torch.rand(2, 50)}
    truth = renn_model.get_rule("isolated_pause")(patterns)
    assert truth.shape == (2, 50) and ((truth >= 0) & (truth <= 1)).all()


def test_named_rules_are_registered_once_and_suggest_close_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_rule("premature_then_pause", Pattern("x"))
    with pytest.raises(ValueError, match="Unknown rule 'premature_then_paus'.*premature_then_pause"):
        get_rule("premature_then_paus")
    with pytest.raises(KeyError, match="detects"):
        Pattern("missing")({"a": torch.zeros(1, 3)})


# ------------------------------------------------------------------------------------------------ the world
def test_reference_rules_on_true_patterns_reproduce_the_rule_events() -> None:
    data = generate(400, seed=5)
    patterns = {"normal_beat": data["patterns"][:, 0], "premature_beat": data["patterns"][:, 1]}
    rule_map = torch.stack([get_rule(name)(patterns) for name in RULE_SERIES_RULES], 1)
    firing = RuleFiring(len(RULE_SERIES_RULES), tolerance=0)
    firing.update(rule_map, data["rule_events"])
    result = firing.compute()
    assert torch.allclose(result["precision"], torch.ones(3)) and torch.allclose(result["recall"], torch.ones(3))
    label = data["label"]
    assert (data["patterns"][label == 0, 1] == 0).all()  # normal series have no premature beat
    counts = data["patterns"][:, 1].sum(-1)
    assert (counts[label == 3] >= 4).all() and (counts[(label == 1) | (label == 2)] <= 3).all()


def test_train_fraction_keeps_a_subset_and_the_epoch_length() -> None:
    module = RuleSeriesDataModule(num_train=200, num_val=20, num_test=20, train_fraction=0.1, batch_size=50)
    module.setup()
    assert len(module.splits["train"]) == 20
    assert sum(len(b["label"]) for b in module.train_dataloader()) == 200
    with pytest.raises(ValueError, match="train_fraction"):
        RuleSeriesDataModule(train_fraction=0.0)


def test_subset_seed_draws_the_train_fraction_subset(tmp_path: Path) -> None:
    """The subset was always drawn with seed + 99, so the data-efficiency "std over seeds" never varied it:
    `subset_seed` draws another subset (the same for the same value); None keeps the subsets recorded before."""
    def kept(**kwargs: Any) -> torch.Tensor:
        module = RuleSeriesDataModule(num_train=200, num_val=8, num_test=8, train_fraction=0.1, **kwargs)
        module.setup()
        return module.splits["train"].tensors["series"]  # (20, 1, T)

    full = RuleSeriesDataModule(num_train=200, num_val=8, num_test=8)
    full.setup()
    drawn = torch.randperm(200, generator=torch.Generator().manual_seed(99))[:20]  # seed + 99, as before
    before = full.splits["train"].tensors["series"][drawn]
    assert torch.equal(kept(), before)  # the default subset is the one drawn before subset_seed existed
    assert torch.equal(kept(subset_seed=3), kept(subset_seed=3)) and not torch.equal(kept(subset_seed=3), kept())
    assert not torch.equal(kept(subset_seed=3), kept(subset_seed=4))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"subset_seed must be an int >= 0 .*; got {bad}"):
            RuleSeriesDataModule(subset_seed=bad)
    np.savez(tmp_path / "s.npz", series=np.random.default_rng(0).normal(size=(40, 16)), label=np.arange(40) % 4)
    rows = []
    for subset_seed in (None, 3, 3, 4):
        module = SeriesFileDataModule(tmp_path / "s.npz", num_classes=4, train_fraction=0.5, subset_seed=subset_seed)
        rows.append(module.sample_names("train"))
    assert rows[1] == rows[2] and rows[0] != rows[1] and rows[1] != rows[3]


def test_data_efficiency_draws_a_subset_per_seed_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--subset-per-seed` sets subset_seed to each seed below fraction 1 (default: the points as before)."""
    import benchmarks.renn_data_efficiency as benchmark

    points: list[dict[str, Any]] = []

    def fake_point(config: str, name: str, point: dict[str, Any], extra: list[str]) -> tuple[dict, dict]:
        points.append(point)
        return {"acc": 0.5, "rule_precision": math.nan if point["seed_everything"] else 0.8}, {}

    monkeypatch.setattr(benchmark, "run_grid_point", fake_point)
    results = benchmark.measure("de", [0.5, 1.0], [0, 1], [])
    assert all(benchmark.SUBSET_KEY not in point for point in points)
    assert benchmark.table(results, [0.5, 1.0])[0]["renn_rule_precision"] == 0.8  # a NaN seed is left out
    points.clear()
    benchmark.measure("de", [0.5, 1.0], [0, 1], [], subset_per_seed=True)
    assert [point.get(benchmark.SUBSET_KEY) for point in points[:4]] == [0, 1, None, None]


def test_series_files_load_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", series=rng.normal(size=(20, 2, 64)), label=rng.integers(0, 3, 20),
             patterns=rng.random((20, 2, 64)))
    module = SeriesFileDataModule(tmp_path / "s.npz", num_classes=3)
    module.setup()
    assert module.model_inputs == {"in_chans": 2, "length": 64}
    assert sum(len(s) for s in module.splits.values()) == 20 and "patterns" in module.splits["train"].tensors
    table = np.concatenate([rng.integers(0, 2, (10, 1)), rng.normal(size=(10, 32))], 1)
    np.savetxt(tmp_path / "s.csv", table, delimiter=",")
    assert SeriesFileDataModule(tmp_path / "s.csv", num_classes=2).model_inputs == {"in_chans": 1, "length": 32}
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        SeriesFileDataModule(tmp_path / "none.npz", num_classes=2)
    np.savez(tmp_path / "bad.npz", series=rng.normal(size=(5, 8)), label=np.zeros(4))
    with pytest.raises(DatasetLayoutError, match="do not match"):
        SeriesFileDataModule(tmp_path / "bad.npz", num_classes=2)
    np.savez(tmp_path / "labels.npz", series=rng.normal(size=(5, 8)), label=np.full(5, 7))
    with pytest.raises(ValueError, match="outside"):
        SeriesFileDataModule(tmp_path / "labels.npz", num_classes=2)


def test_rule_firing_on_hand_made_maps() -> None:
    rule_map = torch.tensor([[[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0]]])
    events = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]])
    metric = RuleFiring(1, tolerance=1)
    metric.update(rule_map, events)
    result = metric.compute()  # fired at 0 (event at 1: ok) and 6 (no event within 1); event at 4 missed
    assert result["precision"].item() == pytest.approx(0.5) and result["recall"].item() == pytest.approx(0.5)


def test_a_rule_that_never_fires_has_no_precision_and_is_left_out_of_the_mean() -> None:
    """A silent rule scored precision 1, so an untrained ReNN (no step above 0.5) reported rule_precision 1.0 with
    recall 0: it is NaN now (nothing claimed, nothing to score), left out of the mean; all silent: the mean is NaN."""
    from zoo.renn.metrics import NamedRuleFiring

    events = torch.zeros(1, 2, 8)
    events[0, :, 2] = 1.0  # both rules have an event at step 2
    rule_map = torch.zeros(1, 2, 8)
    rule_map[0, 0, 6] = 0.9  # rule a fires once, away from its event; rule b never fires
    metric = NamedRuleFiring(["a", "b"], tolerance=1)
    metric.update(rule_map, events)
    result = metric.compute()
    assert result["precision/a"].item() == 0.0 and math.isnan(result["precision/b"].item())
    assert result["precision"].item() == 0.0 and result["recall"].item() == 0.0  # was precision (0 + 1) / 2
    silent = NamedRuleFiring(["a", "b"])
    silent.update(torch.zeros(1, 2, 8), events)  # an untrained model: fires nowhere
    result = silent.compute()
    assert math.isnan(result["precision"].item()) and result["recall"].item() == 0.0  # was precision 1.0


def test_renn_explains_which_rules_fired_where() -> None:
    model = zoo.create_model("renn_series").eval()
    data = generate(4, seed=1)
    out = model(data["series"])
    assert out["rule_map"].shape == (4, 3, 256) and out["patterns"].shape == (4, 2, 256)
    # feed the true patterns through the rule layer: explanations name the true events
    out = {"rule_map": model.rule_layer(data["patterns"]), "patterns": data["patterns"]}
    explained = model.explain(out)
    for sample, events in zip(explained, data["rule_events"]):
        assert sample["premature_then_pause"] == events[0].nonzero().flatten().tolist()


def test_explained_pattern_peaks_are_the_annotated_beats() -> None:
    """Fed the true patterns, the detected steps of each pattern are exactly its annotated peaks (by name)."""
    model = zoo.create_model("renn_series").eval()
    data = generate(8, seed=2)
    explained = model.explain({"rule_map": model.rule_layer(data["patterns"]), "patterns": data["patterns"]})
    premature = 0
    for sample, peaks in zip(explained, data["patterns"]):  # peaks (2, T): normal_beat, premature_beat
        assert sample["normal_beat"] == peaks[0].nonzero().flatten().tolist()
        assert sample["premature_beat"] == peaks[1].nonzero().flatten().tolist()
        premature += len(sample["premature_beat"])
    assert premature > 0  # the check saw premature beats, not only empty lists


# ------------------------------------------------------------------------------------------------ stages
def test_stages_really_freeze(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from losses.renn import ReNNLoss
    from zoo.renn.system import ReNNSystem

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            snapshots.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})

    pl.seed_everything(0, verbose=False)
    data = RuleSeriesDataModule(num_train=64, num_val=16, num_test=16, batch_size=32)
    system = ReNNSystem(model_name="renn_series", num_classes=4, in_chans=None, image_size=None,
                          data_inputs=data.model_inputs, input_key="series", loss=ReNNLoss(), stages=[
                              {"name": "local", "epochs": 1, "train": ["detector"], "losses": ["loss_local"]},
                              {"name": "global", "epochs": 1, "train": ["head"], "losses": ["loss_task"]}])
    start = {k: v.detach().clone() for k, v in system.model.state_dict().items()}
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot()],
                         default_root_dir=tmp_path)
    trainer.fit(system, datamodule=data)
    changed = lambda a, b, prefix: [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]  # noqa: E731
    assert changed(start, snapshots[0], "detector.") and not changed(start, snapshots[0], "head.")
    assert changed(snapshots[0], snapshots[1], "head.") and not changed(snapshots[0], snapshots[1], "detector.")
    with pytest.raises(ValueError, match="trains \\['decoder'\\]"):
        ReNNSystem(model_name="renn_series", in_chans=None, data_inputs=data.model_inputs,
                     stages=[{"name": "x", "epochs": 1, "train": ["decoder"]}])


SMALL_SERIES = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]


def test_compare_trains_renn_against_the_cnn_and_the_lstm(in_tmp_dir: Path) -> None:
    from train import main

    rows = main(["compare", "--config", str(REPO / "configs/renn/rule_series.yaml"), "--trainer.fast_dev_run=true",
                 "--no_explain", *SMALL_SERIES])
    assert [(row["run"], row["model"]) for row in rows] == [("renn", "renn_series"), ("cnn", "baseline_cnn1d"),
                                                            ("lstm", "baseline_lstm")]  # ReNNSystem.TWINS
    per_rule = {f"rule_{key}/{name}" for key in ("precision", "recall") for name in RULE_SERIES_RULES}
    assert {"acc", "rule_precision", "rule_recall", *per_rule} <= set(rows[0])
    assert all("acc" in row and "rule_precision" not in row for row in rows[1:])  # opaque twins: no rule map
    assert (in_tmp_dir / "checkpoints" / "renn_rule_series_compare" / "report.md").is_file()


def test_compare_on_rule_series_writes_the_explanation_table(in_tmp_dir: Path) -> None:
    """The explain stage has a series branch: every run of the comparison (ReNN, the 1-D CNN, the LSTM) gets its rows
    (ReNN its own map, all the Captum feature methods, the random reference) in explanations.csv and report.md."""
    import csv

    from train import main
    from zoo.explain.captum import FEATURE_METHODS

    main(["compare", "--config", str(REPO / "configs/renn/rule_series.yaml"), "--trainer.fast_dev_run=true",
          "--explain_images", "4", *SMALL_SERIES])
    folder = in_tmp_dir / "checkpoints" / "renn_rule_series_compare"
    with open(folder / "explanations.csv") as f:
        rows = list(csv.DictReader(f))
    methods = [*FEATURE_METHODS, "random"]
    assert [(row["run"], row["method"]) for row in rows] == [
        *[("renn", m) for m in ("own", *methods)], *[("cnn", m) for m in methods], *[("lstm", m) for m in methods]]
    assert all(row["mass_in_events"] != "" and row["deletion_vs_random"] != "" for row in rows)
    assert "mass_in_events" in (folder / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ rule losses
@pytest.mark.parametrize("config", ["parts_world_distillation", "parts_world_semantic"])
def test_compare_trains_a_rule_loss_against_its_weight_zero_twin(config: str, in_tmp_dir: Path) -> None:
    from train import main

    path = str(REPO / f"configs/renn/{config}.yaml")
    rows = main(["compare", "--config", path, "--trainer.fast_dev_run=true", "--no_explain", *SMALL_SERIES])
    assert [row["run"] for row in rows] == ["renn", "opaque_twin"] and all("acc" in row for row in rows)
    from zoo.cli.compare import read_compare_spec
    from zoo.cli.lightning import ZooCLI

    twin = read_compare_spec(path)["runs"]["opaque_twin"]
    assert ZooCLI(args=["--config", twin["config"], *twin["args"]], run=False).model.loss.weight == 0


def test_distillation_pi_is_an_epoch_schedule(in_tmp_dir: Path) -> None:
    from train import main

    cli = main(["fit", "--config", str(REPO / "configs/renn/parts_world_distillation.yaml"), *SMALL_SERIES,
                "--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    assert cli.trainer.callback_metrics["schedule/distill_pi"].item() == pytest.approx(1 - 0.95)  # epoch 1



def test_distillation_teacher_matches_its_closed_form() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    rules = [torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[1.0, 1.0, 0.0]])]
    teacher = rule_teacher(probs.log(), rules, [1.0, 0.5], strength=2.0)
    unnormalised = [0.5 * math.exp(-2 * (0 + 0)), 0.3 * math.exp(-2 * (1 + 0)), 0.2 * math.exp(-2 * (0.5 + 0.5))]
    expected = torch.tensor([u / sum(unnormalised) for u in unnormalised])
    assert torch.allclose(teacher[0], expected, atol=1e-6)

    loss = LogicRuleDistillation(rules=[lambda batch, out: rules[0]], strength=2.0, pi_max=0.9, decay=0.5)
    assert loss.set_epoch(1) == {"distill_pi": 0.5} and loss.set_epoch(10) == {"distill_pi": 0.9}
    terms = loss({"logits": probs.log()}, {"label": torch.tensor([1])})
    q = rule_teacher(probs.log(), [rules[0]], [1.0], 2.0)
    assert terms["loss_task"].item() == pytest.approx(0.1 * -math.log(0.3), rel=1e-5)
    assert terms["loss_distill"].item() == pytest.approx(0.9 * -(q * probs.log()).sum().item(), rel=1e-5)


def test_semantic_loss_exactly_one() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.999, 0.001, 0.001]])
    expected = [-math.log(sum(p[b, i].item() * math.prod(1 - p[b, j].item() for j in range(3) if j != i)
                              for i in range(3))) for b in range(2)]
    assert torch.allclose(semantic_loss(p, torch.eye(3)), torch.tensor(expected), atol=1e-5)
    assert expected[1] < 0.01  # a confident single class satisfies the constraint
    terms = SemanticLoss(weight=2.0)({"logits": torch.logit(p)}, {"label": torch.tensor([0, 0])})
    assert terms["loss_semantic"].item() == pytest.approx(2.0 * sum(expected) / 2, rel=1e-4)
    both = SemanticLoss(constraint=[[1, 1, 0], [0, 0, 1]])({"logits": torch.logit(p)}, {"label": torch.tensor([0, 0])})
    manual = -math.log(0.7 * 0.2 * 0.9 + 0.3 * 0.8 * 0.1)
    assert semantic_loss(p[:1], torch.tensor([[1, 1, 0], [0, 0, 1]]))[0].item() == pytest.approx(manual, rel=1e-5)
    assert set(both) == {"loss_task", "loss_semantic"}


def _exactly_one_reference(logits: list[float]) -> float:
    """-log sum_i p_i prod_{j != i} (1 - p_j) in float64 from the logits (log p = -log(1 + e^-x))."""
    log_p = [-math.log1p(math.exp(-x)) for x in logits]
    log_not_p = [-math.log1p(math.exp(x)) for x in logits]
    worlds = [log_p[i] + sum(log_not_p[j] for j in range(len(logits)) if j != i) for i in range(len(logits))]
    top = max(worlds)
    return -(top + math.log(sum(math.exp(w - top) for w in worlds)))


def test_semantic_loss_is_exact_where_the_sigmoids_saturate() -> None:
    """From the logits, not from sigmoid probabilities: saturated outputs (|logit| > ~17 in float32) still have the
    closed form's value and gradient (probabilities clamped to 1 - 1e-7 gave 15.25 and a zero gradient here)."""
    rows = [[20.0, 20.0, -20.0], [-20.0, -20.0, -20.0], [40.0, -40.0, -40.0], [3.0, -1.0, 0.5]]
    logits = torch.tensor(rows, requires_grad=True)
    terms = SemanticLoss(weight=1.0)({"logits": logits}, {"label": torch.zeros(4, dtype=torch.long)})
    expected = [_exactly_one_reference(row) for row in rows]  # 19.31, 18.90, ~8.5e-18, ...
    assert terms["loss_semantic"].item() == pytest.approx(sum(expected) / 4, rel=1e-5)
    terms["loss_semantic"].backward()
    step = 1e-4  # central differences of the float64 reference
    for b, row in enumerate(rows):
        for i in range(3):
            up, down = list(row), list(row)
            up[i], down[i] = row[i] + step, row[i] - step
            slope = (_exactly_one_reference(up) - _exactly_one_reference(down)) / (2 * step) / 4
            assert logits.grad[b, i].item() == pytest.approx(slope, abs=1e-4), (b, i)
    # the saturated rows still learn: with two classes on, both logits' gradient is +1/2 (over the batch of 4:
    # 1/8), with none on, all three's is -1/3 (-1/12)
    assert logits.grad[0, :2].tolist() == pytest.approx([0.125, 0.125], rel=1e-4)
    assert logits.grad[1].tolist() == pytest.approx([-1 / 12] * 3, rel=1e-4)
    from losses.renn import semantic_loss_with_logits  # the per-sample function

    per_sample = semantic_loss_with_logits(logits.detach(), torch.eye(3))
    assert torch.allclose(per_sample, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # a custom constraint on saturated logits: -log(e^-40 + e^-20) (the probability form gave 15.9)
    custom = SemanticLoss(constraint=[[1, 1, 0], [0, 0, 1]])
    value = custom({"logits": torch.full((1, 3), -20.0)}, {"label": torch.tensor([0])})["loss_semantic"]
    assert value.item() == pytest.approx(0.5 * -math.log(math.exp(-40) + math.exp(-20)), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # no half-precision matmul of the log-probabilities
        under_autocast = SemanticLoss(weight=1.0)({"logits": logits.detach()}, {"label": torch.zeros(4).long()})
    assert under_autocast["loss_semantic"].item() == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_parts_world_colour_rule_favours_the_true_class() -> None:
    from datamodules import PartsWorldDataModule

    data = PartsWorldDataModule(num_train=64, num_val=8, num_test=8)
    data.setup()
    batch = {k: v[:64] for k, v in data.splits["train"].tensors.items()}
    batch["image"] = batch["image"].float() / 255 if batch["image"].dtype == torch.uint8 else batch["image"]
    truth = PartsWorldColourRule()(batch, {})  # (64, 6)
    on_true = truth.gather(1, batch["label"][:, None]).squeeze(1)
    assert on_true.mean() > 0.8 and on_true.mean() > truth.mean() + 0.3


def test_data_efficiency_script_runs_a_tiny_grid(in_tmp_dir: Path) -> None:
    from benchmarks.renn_data_efficiency import main

    rows = main(["--fractions", "0.5", "1.0", "--seeds", "0", "--name", "de", "--trainer.fast_dev_run=true",
                 "--data.init_args.num_train=64", "--data.init_args.num_val=32"])
    assert [r["train_fraction"] for r in rows] == [0.5, 1.0]
    assert {"renn_acc", "cnn_acc", "lstm_acc", "renn_minus_best_baseline"} <= set(rows[0])
    assert (in_tmp_dir / "checkpoints" / "de" / "data_efficiency.png").is_file()


def test_renn_loss_matches_an_elementwise_reference() -> None:
    from losses.renn import ReNNLoss

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    pattern_logits, patterns = torch.randn(3, 2, 5), (torch.rand(3, 2, 5) > 0.7).float()
    terms = ReNNLoss(local_weight=0.5, pos_weight=4.0)({"logits": logits, "pattern_logits": pattern_logits},
                                                       {"label": labels, "patterns": patterns})
    task = -sum(logits[i].log_softmax(0)[labels[i]] for i in range(3)) / 3
    p = torch.sigmoid(pattern_logits)
    local = -(4.0 * patterns * torch.log(p) + (1 - patterns) * torch.log(1 - p)).mean()
    assert torch.allclose(terms["loss_task"], task, atol=1e-6)
    assert torch.allclose(terms["loss_local"], 0.5 * local, atol=1e-6)
    assert set(ReNNLoss()({"logits": logits}, {"label": labels})) == {"loss_task"}  # no annotations: no local term


# ------------------------------------------------------------------------------------------------ audit fixes
def _validate(system: Any, data: Any, tmp_path: Path) -> dict[str, Any]:
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path)
    return trainer.validate(system, datamodule=data, verbose=False)[0]


def _renn_system(data: Any, **model_kwargs: Any) -> Any:
    from losses.renn import ReNNLoss
    from zoo.renn.system import ReNNSystem

    return ReNNSystem(model_name="renn_series", num_classes=4, in_chans=None, image_size=None,
                      data_inputs=data.model_inputs, input_key="series", loss=ReNNLoss(), model_kwargs=model_kwargs)


def test_renn_system_matches_patterns_and_rules_to_the_data_by_name(tmp_path: Path) -> None:
    """Swapped `pattern_names` train each channel on its own pattern's annotations, reordered rules are scored
    against their own events, a subset of rules is scored (it crashed at validation), an unknown pattern is refused."""
    from zoo.renn.model import RULE_SERIES_PATTERNS

    data = RuleSeriesDataModule(num_train=32, num_val=32, num_test=16, batch_size=32)
    rules = ["frequent_premature", "premature_then_pause", "premature_interpolated"]
    system = _renn_system(data, pattern_names=["premature_beat", "normal_beat"], rules=rules)
    _validate(system, data, tmp_path)
    batch = {k: v[:32] for k, v in data.splits["val"].tensors.items()}
    mine = batch["patterns"].flip(1)  # (B, 2, T) in the model's order: premature, normal
    out = {"logits": torch.zeros(32, 4), "pattern_logits": (mine * 2 - 1) * 20}  # a perfect detector
    assert system.compute_loss(out, batch, "train")["loss_local"].item() < 1e-6
    metric = system.metrics["val_rule_firing"]
    metric.reset()
    system.update_metrics({"rule_map": system.model.rule_layer(mine)}, batch, "val")
    scores = metric.compute()
    assert metric.rule_names == rules and all(scores[f"{key}/{name}"] == 1 for key in ("precision", "recall")
                                              for name in rules)
    subset = _renn_system(data, rules=["premature_interpolated", "frequent_premature"])
    logged = _validate(subset, data, tmp_path)
    assert {"val/rule_recall/premature_interpolated", "val/rule_recall/frequent_premature"} <= set(logged)
    assert "val/rule_recall/premature_then_pause" not in logged
    with pytest.raises(ValueError, match="\\['pvc'\\] that the data .*does not annotate"):
        _validate(_renn_system(data, pattern_names=["normal_beat", "pvc"], rules=[]), data, tmp_path)
    # the world publishes the names of its rows: the reference patterns and rules
    assert data.pattern_names == RULE_SERIES_PATTERNS and data.rule_event_names == RULE_SERIES_RULES


def test_parts_world_colour_rule_takes_the_datamodules_world_and_normalisation(tmp_path: Path) -> None:
    """The rule reads the world and the normalisation of the data it trains on (a loss config that repeated them
    drifted silently: 0.26 rule truth for the true class with world_seed 1, 4e-05 with normalised images), refuses
    a contradicting world by name, and a class-count mismatch is a named error."""
    from datamodules import PartsWorldDataModule
    from zoo.renn.system import RuleLossSystem

    def true_class_truth(rule: PartsWorldColourRule, data: PartsWorldDataModule) -> float:
        batch = next(iter(data.val_dataloader()))
        return rule(batch, {}).gather(1, batch["label"][:, None]).mean().item()

    for settings in ({"world_seed": 1}, {"mean": [0.5] * 3, "std": [0.25] * 3}):
        data = PartsWorldDataModule(num_classes=6, image_size=64, num_train=8, num_val=64, batch_size=64, **settings)
        loss = LogicRuleDistillation(rules=[PartsWorldColourRule()])
        system = RuleLossSystem(model_name="baseline_tinycnn", num_classes=6, loss=loss)
        _validate(system, data, tmp_path)  # binds the rule to the data
        assert true_class_truth(loss.rules[0], data) > 0.8, settings
    data = PartsWorldDataModule(num_classes=4, image_size=64, num_train=8, num_val=16, batch_size=16)
    with pytest.raises(ValueError, match="world_seed=0 \\(the data's world_seed=1\\)"):
        PartsWorldColourRule(world_seed=0).bind_data(PartsWorldDataModule(world_seed=1, num_train=8, num_val=8))
    with pytest.raises(ValueError, match="classes"):
        batch = next(iter(data.val_dataloader()))
        LogicRuleDistillation([PartsWorldColourRule()])({"logits": torch.randn(16, 4)}, batch)


def test_semantic_loss_refuses_constraints_it_would_miscount() -> None:
    """A repeated assignment counted twice (off by log 2), entries other than 0/1, and a width mismatch (a raw
    matmul error) are named errors."""
    with pytest.raises(ValueError, match="more than once"):
        SemanticLoss(constraint=[[1, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="0 or 1"):
        SemanticLoss(constraint=[[2, 0, 0]])
    with pytest.raises(ValueError, match="2 entries each but the model has 4 outputs"):
        SemanticLoss(constraint=[[1, 0], [0, 1]])({"logits": torch.randn(2, 4)}, {"label": torch.tensor([0, 1])})


def test_series_files_refuse_nan_and_name_file_rows(tmp_path: Path) -> None:
    """NaN (UCR-style padding) is refused at load naming the rows; NaN patterns too; samples are named by row."""
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(0, 2, (10, 1)), rng.normal(size=(10, 32))], 1)
    table[[3, 7], 20:] = np.nan
    np.savetxt(tmp_path / "ucr.csv", table, delimiter=",")
    with pytest.raises(DatasetLayoutError, match="rows \\[3, 7\\].*CSV lines \\[4, 8\\].*pad"):
        SeriesFileDataModule(tmp_path / "ucr.csv", num_classes=2)
    patterns = rng.random((10, 2, 32))
    patterns[5, 0, 4] = np.nan
    np.savez(tmp_path / "p.npz", series=rng.normal(size=(10, 32)), label=rng.integers(0, 2, 10), patterns=patterns)
    with pytest.raises(DatasetLayoutError, match="patterns of 1 row.*rows \\[5\\]"):
        SeriesFileDataModule(tmp_path / "p.npz", num_classes=2)
    series = rng.normal(size=(20, 16))
    series[:, 0] = np.arange(20)  # each series carries its row number
    np.savez(tmp_path / "s.npz", series=series, label=rng.integers(0, 2, 20), patterns=rng.random((20, 2, 16)),
             pattern_names=np.array(["a", "b"]))
    module = SeriesFileDataModule(tmp_path / "s.npz", num_classes=2, train_fraction=0.5)
    assert module.pattern_names == ["a", "b"]
    module.setup()
    for split in ("train", "val", "test"):
        rows = module.splits[split].tensors["series"][:, 0, 0].long().tolist()
        assert module.sample_names(split) == [f"row {r}" for r in rows]


def test_renn_predictions_read_out_rules_and_patterns() -> None:
    """predictions.csv gets each rule's firing steps and each pattern's peaks (it got nothing but the class)."""
    data = RuleSeriesDataModule(num_train=8, num_val=8, num_test=8)
    system = _renn_system(data)
    batch = generate(4, seed=3)
    out = {"rule_map": system.model.rule_layer(batch["patterns"]), "patterns": batch["patterns"]}
    columns = system.prediction_extras(out, batch)["columns"]
    from zoo.renn.system import step_ranges

    assert set(columns) == {f"rule:{n}" for n in RULE_SERIES_RULES} | {"pattern:normal_beat", "pattern:premature_beat"}
    for i in range(4):
        assert columns["pattern:premature_beat"][i] == step_ranges(batch["patterns"][i, 1].nonzero().flatten().tolist())
        assert columns["rule:premature_then_pause"][i] == step_ranges(batch["rule_events"][i, 0].nonzero().flatten()
                                                                      .tolist())
    assert step_ranges([3, 12, 13, 14, 40]) == "3 12-14 40" and step_ranges([]) == ""
    assert any(c == "0-255" for c in columns["rule:frequent_premature"]) or (batch["label"] != 3).all()


def test_rules_of_a_users_module_are_named_module_colon_attr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A config (train.py) names a rule of the user's own module as "module:attr": imported and registered."""
    import zoo.renn.model as renn_model

    monkeypatch.setattr(renn_model, "_RULES", dict(renn_model._RULES))
    (tmp_path / "my_renn_rules.py").write_text(
        "from zoo.renn.model import CountAtLeast, Pattern, register_rule\n"
        "many = CountAtLeast(Pattern('normal_beat'), 8)\n"
        "few = register_rule('few_premature', ~CountAtLeast(Pattern('premature_beat'), 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = zoo.create_model("renn_series", rules=["my_renn_rules:many", "my_renn_rules.few", "frequent_premature"])
    assert model.rule_names == ["my_renn_rules:many", "few_premature", "frequent_premature"]
    assert model(torch.randn(2, 1, 256))["rule_map"].shape == (2, 3, 256)
    with pytest.raises(ValueError, match="module:attr"):
        get_rule("my_own_rule")
    with pytest.raises(TypeError, match="not a zoo.renn.model.Rule"):
        get_rule("my_renn_rules:register_rule")


def test_a_loaded_renn_warns_when_a_rule_is_now_defined_otherwise(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules are saved by name; their definitions travel with the weights (checkpoints, safetensors exports), and a
    rule of that name defined otherwise at load time is a warning, not a silent change of the model."""
    import warnings

    from safetensors.torch import load_file, save_file

    import zoo.renn.model as renn_model

    monkeypatch.setattr(renn_model, "_RULES", dict(renn_model._RULES))
    register_rule("audit_rule", CountAtLeast(Pattern("premature_beat"), 4))
    trained = zoo.create_model("renn_series", rules=["audit_rule"])
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    state = load_file(str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same definition: no warning
        zoo.create_model("renn_series", rules=["audit_rule"]).load_state_dict(state)
    renn_model._RULES.pop("audit_rule")
    register_rule("audit_rule", CountAtLeast(Pattern("premature_beat"), 2))
    with pytest.warns(UserWarning, match="'audit_rule' were CountAtLeast\\(Pattern\\('premature_beat'\\), 4.*now are "
                                         "CountAtLeast\\(Pattern\\('premature_beat'\\), 2"):
        zoo.create_model("renn_series", rules=["audit_rule"]).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "rule_layer.definitions"}  # saved before definitions were kept
    assert not zoo.create_model("renn_series", rules=["audit_rule"]).load_state_dict(older).missing_keys
