"""CUB sentence lines without a word are no sentences; each family's explanation table in a compare report is
followed by a note that is true for it (L2X explains the black box's predicted class, not the true class)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import REPO


def test_cub_lines_without_words_are_no_sentences(cub_root: Path) -> None:
    """A line of punctuation or emoji ("...", "😀 😀") tokenises to no word and was encoded <bos> <eos>: a reference
    row that training picked as a target (the model learnt to stop at once) while evaluation dropped it. Such lines
    are no sentences now; a file of nothing else is an image without sentences, as an empty file."""
    from datamodules import CUB200DataModule
    from zoo.textual.system import reference_rows

    images_root = cub_root / "CUB_200_2011" / "images"
    images = sorted(images_root.rglob("*.jpg"))
    texts = {0: "...\n😀 😀\nthis bird is red\n   \n-- !!\nits wings are grey\n",
             1: "... !!!\n😀\n",  # no usable sentence
             2: ""}  # an empty file: the image without sentences of before
    for i, path in enumerate(images):
        target = cub_root / "text_c10" / path.relative_to(images_root).with_suffix(".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(texts.get(i, "a small bird\n"), encoding="utf-8")
    data = CUB200DataModule(str(cub_root), image_size=32)
    captions = data.index.captions  # (N, R, L)
    rows = {str(path): row for row, path in enumerate(data.index.paths)}
    first, wordless, empty = (rows[str(images[i])] for i in range(3))
    bos_eos_only = (captions[..., 0] == 1) & (captions[..., 1] == 2)  # (N, R) <bos> <eos>: no word
    assert not bos_eos_only.any()
    assert reference_rows(captions[first]).tolist() == [True, True] + [False] * 8  # the two worded lines
    decoded = [[data.vocabulary[t] for t in row.tolist() if t > 3] for row in captions[first, :2]]
    assert decoded == [["this", "bird", "is", "red"], ["its", "wings", "are", "grey"]]
    assert (captions[wordless] == 0).all() and torch.equal(captions[wordless], captions[empty])


def test_l2x_compare_report_notes_the_black_boxs_predicted_class(in_tmp_dir: Path) -> None:
    """`train.py compare` of an L2X config wrote the image families' note under its explanation table ("Every map
    explains the true class", deletion, ROAD), but L2X's rows explain the black box's predicted class and score
    other columns: the report says so now. The report goes beside the runs, in the logger's save_dir (it went to
    checkpoints/<name>/ whatever the save_dir, and the runs' printed folders were not theirs)."""
    from train import main
    from zoo.explain.scores import EXPLANATION_NOTE

    main(["compare", "--config", str(REPO / "configs/l2x/xor.yaml"), "--trainer.max_epochs=1",
          "--data.init_args.num_train=256", "--data.init_args.num_val=32", "--explain_images=8",
          "--progress_bar.refresh_rate=0", "--trainer.logger.init_args.save_dir=elsewhere"])
    assert not (in_tmp_dir / "checkpoints").exists()
    assert (in_tmp_dir / "elsewhere" / "l2x_xor_compare" / "l2x" / "config.yaml").is_file()
    report = (in_tmp_dir / "elsewhere" / "l2x_xor_compare" / "report.md").read_text()
    assert "true class" not in report and EXPLANATION_NOTE not in report and "deletion" not in report
    assert "Every method explains the black box's predicted class" in report and "posthoc_acc: the black box" in report

    from zoo.l2x.scores import EXPLANATION_NOTE as L2X_NOTE

    assert report.rstrip().endswith(L2X_NOTE)  # the L2X rows' own note, alone: every run with rows is L2X's


def test_each_family_supplies_the_note_of_its_rows() -> None:
    """The image and series rows keep the note they had; L2X's rows (`compare_explainers`) carry theirs; compare
    prints one note alone, or each note after the runs it is for when the runs' families differ."""
    import zoo
    from zoo.cli.compare import explanation_notes
    from zoo.explain.scores import EXPLANATION_NOTE, explanation_note, score_explanations
    from zoo.l2x.scores import EXPLANATION_NOTE as L2X_NOTE
    from zoo.l2x.scores import compare_explainers

    assert EXPLANATION_NOTE.startswith("Every map explains the true class. Raw deletion_auc and road_morf compare")
    model = zoo.create_model("baseline_tinycnn", num_classes=2)
    image_rows, _ = score_explanations(model, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), methods=("saliency",),
                                       metrics=("deletion",), step=64)
    assert explanation_note(image_rows) == EXPLANATION_NOTE  # unchanged for the image and series families
    assert explanation_note([{"method": "cam"}]) == EXPLANATION_NOTE  # a family's plain list of rows, as before

    torch.manual_seed(0)
    selector = zoo.create_model("l2x_vector", num_features=10, k=2, num_classes=2).eval()
    black_box = zoo.create_model("baseline_mlp", num_features=10, num_classes=2).eval()
    x = torch.randn(6, 10)
    explained = compare_explainers({"l2x": selector}, black_box, None, x, torch.zeros(6, dtype=torch.long), None, 2,
                                   ["l2x", "saliency"])
    assert [row["method"] for row in explained.rows] == ["l2x", "saliency"]
    assert explanation_note(explained.rows) == L2X_NOTE
    assert "predicted class" in L2X_NOTE and "true class" not in L2X_NOTE and "deletion" not in L2X_NOTE

    assert explanation_notes({EXPLANATION_NOTE: ["model", "plain"]}) == EXPLANATION_NOTE  # one family: as before
    mixed = explanation_notes({L2X_NOTE: ["l2x"], EXPLANATION_NOTE: ["black_box"]})
    assert mixed == f"Run l2x: {L2X_NOTE}\n\nRun black_box: {EXPLANATION_NOTE}"
