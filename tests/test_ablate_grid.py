"""An ablation's grid says what it trains: two points that resolve to one run are refused, several --config files
are layered as fit layers them, the table writes the grid's values as given, a study under another study's name
keeps the earlier table, and grid mistakes and HPARAMS columns are said plainly (the audit's hunt C)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_ablate_journey import BASELINE, FAST, ICNN, SMALL_WORLD
from tests.test_compare_ablate import said_once
from tests.test_tensorboard_hparams import hparams_entries

WEIGHT = "model.init_args.loss.init_args.weight"


def test_two_points_that_resolve_to_one_run_are_refused_before_any_trains(in_tmp_dir: Path) -> None:
    """`--grid model.init_args.num_classes=[6,10]` (the data sets it) trained two 6-class models, and one key given as
    two axes in two spellings trained one setting twice; the table showed each as rows of their own."""
    from zoo.cli.ablate import check_distinct_settings, check_points

    seen = {"abc": {"model.init_args.num_classes": 6}}
    with pytest.raises(ValueError) as error:
        check_distinct_settings(seen, "abc", {"model.init_args.num_classes": 10})
    assert "grid points num_classes=6 and num_classes=10 resolve to the same settings" in str(error.value)
    assert "ablate data.init_args.num_classes instead" in str(error.value)
    check_distinct_settings(seen, "other", {"model.init_args.num_classes": 12})  # another hash: accepted
    lr = "model.init_args.optimizer.init_args.lr"  # two folders (lr=1, lr=1.0), one float: the axis was not named
    with pytest.raises(ValueError, match=rf"differ in {lr}: 1 and 1.0\. {lr}: 1 and 1.0 are the same value once the "
                                         r"setting reads them"):
        check_distinct_settings({"d": {lr: 1}}, "d", {lr: 1.0})

    other_spelling = "model.loss.init_args.weight"  # jsonargparse takes it for WEIGHT, and it comes last
    with pytest.raises(ValueError, match=r"weight=0,weight=1 and weight=1,weight=1 resolve to the same settings") \
            as error:
        check_points(ICNN, "spellings", [{WEIGHT: 0, other_spelling: 1}, {WEIGHT: 1, other_spelling: 1}], SMALL_WORLD)
    assert f"{WEIGHT}: 0 and 1" in str(error.value) and "give each setting one axis" in str(error.value)
    assert not (in_tmp_dir / "checkpoints").exists()


def test_repeated_configs_reach_every_point_in_order_and_compare_takes_one(
        in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """argparse kept the last --config: a base config and a tweak of it ran the tweak alone and blamed a correct
    key in it. compare, whose --config is one spec, says so instead of dropping one."""
    import zoo.cli
    from zoo.cli.ablate import check_logger, point_args, point_cli

    Path("over.yaml").write_text("model:\n  init_args:\n    optimizer:\n      init_args:\n        lr: 0.05\n")
    called = {}
    monkeypatch.setattr(zoo.cli, "ablate", lambda config, grid, name, extra: called.update(config=config, name=name))
    zoo.cli.main(["ablate", "--config", BASELINE, "--config", "over.yaml", "--grid", "seed_everything=[0]"])
    assert called == {"config": [BASELINE, "over.yaml"], "name": "baselines_parts_world_ablation"}  # first's name
    assert point_args([BASELINE, "over.yaml"], "n", {}, [])[:4] == ["--config", BASELINE, "--config", "over.yaml"]
    cli = point_cli([BASELINE, "over.yaml"], "layered", {"seed_everything": 0}, SMALL_WORLD)
    optimizer = cli.config["model.init_args.optimizer"]
    assert optimizer.init_args.lr == 0.05 and cli.config["model.init_args.model_name"] == "baseline_tinycnn"
    Path("nolog.yaml").write_text("trainer:\n  logger: false\n")
    with pytest.raises(ValueError, match=r"nolog.yaml \(trainer.logger: False\) gives none"):
        check_logger([BASELINE, "nolog.yaml"], [])
    error = said_once(capsys, ["compare", "--config", BASELINE, "--config", "over.yaml"])
    assert f"compare takes one --config (a compare spec or a family config), got 2: {BASELINE}, over.yaml" in error


def test_the_table_writes_setting_columns_as_given(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ema_decay 0.99999 and 0.999999 both read 1.0 in ablation.md: a setting is not a metric to round."""
    from zoo.cli.ablate import summarise
    from zoo.cli.report import write_report

    rows = summarise([({"model.init_args.ema_decay": 0.99999}, {"acc": 0.123456789}),
                      ({"model.init_args.ema_decay": 0.999999}, {"acc": 0.6})])
    write_report(tmp_path, {"ablation": rows}, {"acc": True}, stem="ablation", settings=["ema_decay", "seeds"])
    markdown = (tmp_path / "ablation.md").read_text()
    assert "| 0.99999 | 1 | 0.1235 |" in markdown and "| 0.999999 | 1 | 0.6 |" in markdown  # metrics still rounded


def test_grid_values_given_twice_and_keys_with_spaces_or_none_are_said_plainly() -> None:
    from zoo.cli.ablate import parse_grid

    with pytest.raises(ValueError, match=r"--grid seed_everything: the value 0 is given twice"):
        parse_grid(["seed_everything=[0,0]"])
    with pytest.raises(ValueError, match=r"--grid a.flag: true and yes are the same value once read as YAML"):
        parse_grid(["a.flag=[true,false,yes]"])
    with pytest.raises(ValueError, match=r"--grid x.lr: 1e-3 and 0.001 are the same value .* share the folder "
                                         r"'lr=0.001'"):
        parse_grid(["x.lr=[1e-3,0.001]"])
    assert parse_grid([" seed_everything =[0,1]"]) == {"seed_everything": [0, 1]}
    with pytest.raises(ValueError, match=r"--grid '=\[1,2\]' names no key"):
        parse_grid(["=[1,2]"])


def test_each_hparams_column_has_one_type(tmp_path: Path) -> None:
    """torch stores a bool as the number 1.0 and None as nothing ("None" as ablate wrote it), so a [null, 0.1] axis
    was a string in one point's entry and a number in the other's."""
    from zoo.cli.ablate import write_hparams

    grid = {"trainer.gradient_clip_val": [None, 0.1], "a.flag": [True, False], "b.lr": [0.1, 1]}
    for clip, flag in ((None, True), (0.1, False)):
        write_hparams(tmp_path / "hparams" / str(clip), {"trainer.gradient_clip_val": clip, "a.flag": flag,
                                                         "b.lr": 1}, {"acc": 0.5}, grid)
    sessions = {name: entry["session"] for name, entry in hparams_entries(tmp_path).items()}
    assert sessions == {"hparams/None": {"trainer.gradient_clip_val": "null", "a.flag": "true", "b.lr": 1.0},
                        "hparams/0.1": {"trainer.gradient_clip_val": "0.1", "a.flag": "false", "b.lr": 1.0}}
    write_hparams(tmp_path / "alone", {"a.flag": True}, {"acc": 0.5})  # no grid (a benchmark's point): its value's
    assert hparams_entries(tmp_path / "alone")["."]["session"] == {"a.flag": "true"}


def test_a_study_over_other_axes_keeps_the_earlier_table(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A second study under the same --name replaced the first's ablation.md and removed its HPARAMS entries without
    a word. One tiny real ablate over a tweak config on top of the base: the earlier table (written here as a grid
    over weight_decay left it) moves to stale/, the line says which entries went, and the new table has the exact
    value."""
    from zoo.cli import main

    study = in_tmp_dir / "checkpoints" / "studies"
    (study / "hparams" / "weight_decay=0.1").mkdir(parents=True)
    (study / "ablation.csv").write_text("weight_decay,seeds,acc_mean,acc_std\n0.001,1,0.5,0.0\n")
    (study / "ablation.md").write_text("## ablation\n")
    Path("over.yaml").write_text("model: {init_args: {optimizer: {init_args: {weight_decay: 0.0123}}}}\n")
    capsys.readouterr()
    main(["ablate", "--config", BASELINE, "--config", "over.yaml", "--name", "studies",
          "--grid", "model.init_args.optimizer.init_args.lr=[0.000012345]", *FAST])
    printed = capsys.readouterr().out
    (stale,) = (study / "stale").iterdir()
    assert stale.name.startswith("ablation-") and sorted(p.name for p in stale.iterdir()) == ["ablation.csv",
                                                                                              "ablation.md"]
    assert f"ablate: checkpoints/studies held the table of another study (its axes: weight_decay; this grid's: lr): " \
           f"moved to {stale.relative_to(in_tmp_dir)}, and its HPARAMS entries removed (weight_decay=0.1; their runs " \
           f"stay)." in printed
    assert sorted(p.name for p in (study / "hparams").iterdir()) == ["lr=1.2345e-05"]
    assert "| 1.2345e-05 | 1 |" in (study / "ablation.md").read_text()
    settings = json.loads((study / "lr=1.2345e-05" / "settings.json").read_text())["config"]
    assert settings["model"]["init_args"]["optimizer"]["init_args"]["weight_decay"] == 0.0123  # both configs
    assert settings["model"]["init_args"]["model_name"] == "baseline_tinycnn"
