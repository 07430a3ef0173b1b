"""What a new family (README: How to add a family) gets without asking: the "every family" tests cover it, or say
they do not; and its picture callback, which also runs in every twin compare trains from its config, fails with an
error that names it.

The slow "every family" tests take their cases from hand-written lists (kill-and-resume, bf16 autocast, loading a
checkpoint written with the config's loss, the op-count benchmark the host-sync and compile tests read). A family
missing from one was simply not tested; here every family of `zoo.FAMILIES` must appear in each. A list entry's
families are read from its config, not guessed from its name: the package of its System class (`zoo.<family>`) and
`zoo.model_family` of the config's `model_name` (or of a `--model.init_args.model_name=` override in its arguments).
Every package of `zoo.FAMILIES` is a trainable family (`zoo.ENGINE_PACKAGES`, the engine's, are left out by `zoo`
itself), so none is excluded here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml

import zoo
from tests.conftest import REPO
from zoo.engine.callbacks import FixedBatchCallback
from zoo.engine.system import ZooSystem

MODEL_NAME_OPTION = "--model.init_args.model_name="
MODEL_OPTION = "--model="


def config_families(config: str | Path, args: Sequence[str] = ()) -> set[str]:
    """The families a config (relative to the repo, or absolute) trains with `args` on top: its System's package
    under zoo/ (a System of the engine's, none) and its model's family (`zoo.model_family`), where it names one."""
    model = yaml.safe_load((REPO / config).read_text())["model"]
    class_path, model_name = model["class_path"], (model.get("init_args") or {}).get("model_name")
    for arg in args:  # later options win, as on the command line
        if arg.startswith(MODEL_OPTION):
            class_path = arg.removeprefix(MODEL_OPTION)
        elif arg.startswith(MODEL_NAME_OPTION):
            model_name = arg.removeprefix(MODEL_NAME_OPTION)
    module, _, name = class_path.rpartition(".")
    package = getattr(importlib.import_module(module), name).__module__.split(".")
    families = {package[1]} if package[0] == "zoo" and len(package) > 1 and package[1] in zoo.FAMILIES else set()
    return families | ({zoo.model_family(model_name)} if model_name else set())


def every_family_lists() -> dict[str, list[tuple[str, Sequence[str]]]]:
    """Each hand-written "every family" list as (config, its arguments) entries, by where it lives."""
    from benchmarks.op_counts import FAMILIES as OP_COUNT_FAMILIES
    from tests.test_cli import BF16_CONFIGS
    from tests.test_load_from_checkpoint import test_every_family_loads_a_checkpoint_written_with_its_configs_loss
    from tests.test_resume import INSIDE_STAGE_CASES, RESUME_CASES

    marks = test_every_family_loads_a_checkpoint_written_with_its_configs_loss.pytestmark
    (loaded,) = [m.args[1] for m in marks if m.name == "parametrize" and m.args[0] == "config"]
    return {
        # a family is resumed mid-epoch by one of the two kill-and-resume tests (INSIDE_EPOCH_KILLS reruns cases of
        # RESUME_CASES with validation inside the epoch; the staged families are INSIDE_STAGE_CASES)
        "tests/test_resume.py RESUME_CASES + INSIDE_STAGE_CASES": [
            (config, extra) for config, extra in [*RESUME_CASES.values(), *INSIDE_STAGE_CASES.values()]],
        "tests/test_cli.py BF16_CONFIGS": [(config, ()) for config in BF16_CONFIGS],
        "tests/test_load_from_checkpoint.py test_every_family_loads_a_checkpoint_written_with_its_configs_loss": [
            (f"configs/{config}", ()) for config in loaded],
        "benchmarks/op_counts.py FAMILIES (host-sync and compile tests)": list(OP_COUNT_FAMILIES.values()),
    }


def uncovered(lists: dict[str, Iterable[tuple[str, Sequence[str]]]]) -> dict[str, list[str]]:
    """Per list, the families of `zoo.FAMILIES` (read now) that none of its entries trains."""
    missing = {}
    for where, entries in lists.items():
        covered = set().union(*(config_families(config, args) for config, args in entries))
        if absent := sorted(set(zoo.FAMILIES) - covered):
            missing[where] = absent
    return missing


def test_every_family_is_in_every_every_family_list() -> None:
    """A new family (a folder under zoo/) must be added to each list: README's guide, step 7."""
    missing = uncovered(every_family_lists())
    assert not missing, "families without a case (README: How to add a family, step 7): " + "; ".join(
        f"{where}: {', '.join(families)}" for where, families in missing.items())


def test_a_new_family_missing_from_the_lists_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails for a family the lists do not hold (as a family folder added without its cases)."""
    lists = every_family_lists()
    monkeypatch.setattr(zoo, "FAMILIES", (*zoo.FAMILIES, "sparseattn"))
    assert uncovered(lists) == {where: ["sparseattn"] for where in lists}
    assert config_families("configs/renn/parts_world_distillation.yaml") == {"renn", "baselines"}  # System, model
    assert config_families("configs/textual/explanation.yaml") == {"textual"}  # model named by the System
    assert config_families("configs/l2x/xor.yaml", [MODEL_OPTION + "zoo.baselines.system.ClassifierSystem",
                                                    MODEL_NAME_OPTION + "baseline_mlp"]) == {"baselines"}


class OwnKeyCallback(FixedBatchCallback):
    """A family's picture callback as first written: it reads its model's own key without asking."""

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: Any) -> None:
        out = pl_module.model(torch.rand(2, 3, 32, 32))
        out["attention"].sum()  # (2, 1, h, w) in the family's own model; a plain classifier has no such key


def test_a_callback_reading_a_key_the_twin_lacks_names_itself_the_run_and_the_remedy() -> None:
    """The family's callback of its config ran in compare's plain_cnn twin too and died with a raw `KeyError:
    'attention'` (after two runs had trained), naming neither the callback nor the run."""
    system = ZooSystem(model_name="baseline_tinycnn", num_classes=3, image_size=32).train()
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, logger=SimpleNamespace(
        name="sparseattn_parts_world_plain_cnn"))
    with pytest.raises(RuntimeError) as raised:
        OwnKeyCallback().on_validation_epoch_end(trainer, system)
    message = str(raised.value)
    for part in ("OwnKeyCallback", "'attention'", "ZooSystem", "baseline_tinycnn (OpaqueClassifier)",
                 "sparseattn_parts_world_plain_cnn", "not in out: return", "--trainer.callbacks=null", "TWINS"):
        assert part in message, (part, message)
    assert isinstance(raised.value.__cause__, KeyError)
    assert system.training  # the training mode is put back
