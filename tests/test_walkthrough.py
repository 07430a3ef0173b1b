"""The README's newcomer walk-through, run command by command on a tiny ImageFolder (the commands are read from the
README, so the two cannot drift apart). Only the budget is cut (appended overrides: epochs, image and batch size;
compare skips the explainers), and the "pretrained" weights are a saved random resnet18: nothing downloads."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO

FAST = {  # appended to each train.py command: later options win
    "fit": ["--trainer.max_epochs=3", "--data.init_args.image_size=32", "--data.init_args.batch_size=4"],
    "compare": ["--trainer.max_epochs=1", "--data.init_args.batch_size=4", "--no_explain"],
    "predict": [],
}


def walkthrough() -> tuple[list[str], str]:
    """The bash commands (continuation lines joined, comments dropped) and the Python snippet of the README."""
    text = REPO.joinpath("README.md").read_text()
    section = text.split("<!-- walkthrough:start -->")[1].split("<!-- walkthrough:end -->")[0]
    bash, python = re.findall(r"```bash\n(.*?)```", section, re.S)[0], re.findall(r"```python\n(.*?)```", section,
                                                                                  re.S)[0]
    lines = [line for line in bash.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return lines, python


def test_the_readme_walkthrough_runs_on_a_tiny_image_folder(image_folder_root: Path, in_tmp_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from train import main

    data = in_tmp_dir / "data" / "my_images"
    data.parent.mkdir()
    image_folder_root.rename(data)  # the README's own paths, relative to the working directory
    (in_tmp_dir / "configs").symlink_to(REPO / "configs")
    commands, snippet = walkthrough()
    assert [shlex.split(c)[:3] for c in commands] == [["python", "-c", shlex.split(commands[0])[2]],
                                                      ["python", "train.py", "fit"], ["python", "train.py", "compare"],
                                                      ["python", "train.py", "predict"]]
    code = shlex.split(commands[0])[2]
    assert "pretrained=True" in code
    exec(code.replace("pretrained=True", "pretrained=False"), {})  # the same file, random weights: no download
    assert Path("resnet18.pth").is_file()

    runs = {}
    for command in commands[1:]:
        args = shlex.split(command)[2:]
        runs[args[0]] = main([*args, *FAST[args[0]]])

    fit_cli = runs["fit"]
    assert fit_cli.datamodule.mean == pytest.approx([0.485, 0.456, 0.406])  # from resnet18's pretrained_cfg
    assert fit_cli.model.class_names == ["cat", "dog"]
    groups = fit_cli.trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["backbone", "rest"]
    assert groups[0]["lr"] == pytest.approx(groups[1]["lr"] / 10)
    assert {row["run"] for row in runs["compare"]} >= {"icnn", "plain_cnn"}
    assert (in_tmp_dir / "checkpoints" / "icnn_image_folder_compare" / "report.md").is_file()
    predictions = in_tmp_dir / "checkpoints" / "baselines_image_folder" / "predictions"
    with (predictions / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {row["pred_name"] for row in rows} <= {"cat", "dog"}
    assert len(list(predictions.glob("*.png"))) == 4

    printed: list[tuple] = []
    scope = {"print": lambda *values: printed.append(values)}
    exec(snippet, scope)
    assert printed[0][0] in ("cat", "dog") and 0.5 <= printed[0][1] <= 1
    assert scope["own"].shape == scope["post_hoc"].shape == (1, 128, 128)
    assert (scope["own"] >= 0).all() and scope["own"].amax() > 0
