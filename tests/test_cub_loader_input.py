"""CUB-200-2011 index files read as the release defines them, and bad input refused naming the file: part_locs.txt
through the same id alignment as the other index files, train_test_split.txt values 0/1 only, class and attribute
names by their id column, a repeated images.txt id blamed on images.txt, and malformed lines or non-UTF-8 sentence
files said as DatasetLayoutErrors instead of an IndexError or UnicodeDecodeError."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules import CUB200DataModule, DatasetLayoutError


def edit_lines(path: Path, edit) -> None:
    """Rewrite `path` with edit(its lines)."""
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def test_part_locs_rows_align_with_images_txt(cub_root: Path) -> None:
    """An image without part rows, a repeated (image, part) row and a <visible> other than 0/1 are refused (they
    were: all parts silently not visible, the last row winning, the 7 kept)."""
    locs = cub_root / "CUB_200_2011" / "parts" / "part_locs.txt"
    original = locs.read_text().splitlines()
    edit_lines(locs, lambda lines: [ln for ln in lines if not ln.startswith("6 ")])
    with pytest.raises(DatasetLayoutError, match=r"part_locs.txt lacks image ids \[6\]"):
        CUB200DataModule(str(cub_root))
    edit_lines(locs, lambda lines: [ln for ln in original if not ln.startswith("6 14 ")])
    with pytest.raises(DatasetLayoutError, match=r"lacks some of the 15 parts of image ids \[6\]"):
        CUB200DataModule(str(cub_root))
    edit_lines(locs, lambda lines: [*original, "3 1 50.0 30.0 1"])
    with pytest.raises(DatasetLayoutError, match=r"part_locs.txt lists \(image id 3, part 1\) 2 times"):
        CUB200DataModule(str(cub_root))
    edit_lines(locs, lambda lines: [original[0].rsplit(" ", 1)[0] + " 7", *original[1:]])
    with pytest.raises(DatasetLayoutError, match=r"part_locs.txt: <visible> must be 0 or 1; image id 3 part 1 has 7"):
        CUB200DataModule(str(cub_root))
    edit_lines(locs, lambda lines: [*original, "99 1 5.0 5.0 1"])  # an image images.txt does not list: dropped
    assert CUB200DataModule(str(cub_root)).index.landmarks.shape == (8, 15, 3)


def test_train_test_split_values_other_than_0_1_are_refused(cub_root: Path) -> None:
    split = cub_root / "CUB_200_2011" / "train_test_split.txt"
    edit_lines(split, lambda lines: [lines[0].split()[0] + " 2", *lines[1:]])
    with pytest.raises(DatasetLayoutError, match=r"train_test_split.txt: <is_training_image> must be 1 \(train\) "
                                                 r"or 0 \(test\); image ids \[3\] have \[2\]"):
        CUB200DataModule(str(cub_root))


def test_class_names_follow_the_id_column_and_ids_are_1_to_n(cub_root: Path) -> None:
    classes = cub_root / "CUB_200_2011" / "classes.txt"
    edit_lines(classes, lambda lines: lines[::-1])
    assert CUB200DataModule(str(cub_root)).class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross",
                                                           "003.Sooty_Albatross"]
    classes.write_text("1 a\n3 c\n4 d\n")
    with pytest.raises(DatasetLayoutError, match=r"classes.txt: its 3 class ids must be 1..3, without gaps; \[2\] are "
                                                 r"missing and \[4\] listed instead"):
        CUB200DataModule(str(cub_root))
    classes.write_text("1 a\n2 b\n2 c\n")
    with pytest.raises(DatasetLayoutError, match=r"classes.txt:3: class id 2 is listed again \(first on line 2\)"):
        CUB200DataModule(str(cub_root))
    classes.write_text("1 a\n2\n3 c\n")  # was: IndexError
    with pytest.raises(DatasetLayoutError, match=r"classes.txt:2: expected '<class_id> <class name>'"):
        CUB200DataModule(str(cub_root))
    classes.write_bytes("\ufeff1 a\r\n2 b\r\n3 c\r\n".encode())  # a byte-order mark, Windows line ends: read
    assert CUB200DataModule(str(cub_root)).class_names == ["a", "b", "c"]


def test_without_classes_txt_classes_are_named_by_their_1_based_ids(cub_root: Path) -> None:
    """Named "0".."C-1", one below the ids image_class_labels.txt lists: predictions.csv's "0" meant CUB class 1.
    The labels stay 0-based."""
    (cub_root / "CUB_200_2011" / "classes.txt").unlink()
    data = CUB200DataModule(str(cub_root))
    assert data.class_names == ["1", "2", "3"]
    ids = [int(line.split()[1]) for line in (cub_root / "CUB_200_2011" / "image_class_labels.txt").read_text()
           .splitlines()]
    assert [data.class_names[label] for label in data.index.labels.tolist()] == [str(i) for i in ids]


def write_attributes(cub_root: Path, names: str) -> None:
    """Every image with attributes 1..3 present (certainty 4), and attributes.txt beside CUB_200_2011/."""
    ids = [ln.split()[0] for ln in (cub_root / "CUB_200_2011" / "images.txt").read_text().splitlines()]
    folder = cub_root / "CUB_200_2011" / "attributes"
    folder.mkdir(exist_ok=True)
    (folder / "image_attribute_labels.txt").write_text("".join(f"{i} {a} 1 4 1.5\n" for i in ids for a in (1, 2, 3)))
    (cub_root / "attributes.txt").write_text(names)


def test_attribute_names_follow_the_id_column_and_cover_every_attribute(cub_root: Path) -> None:
    write_attributes(cub_root, "3 has_c\n1 has_a\n2 has_b\n")
    data = CUB200DataModule(str(cub_root), attributes=True, min_attribute_classes=1)
    assert data.attribute_names == ["has_a", "has_b", "has_c"]
    write_attributes(cub_root, "1 has_a\n2 has_b\n")  # was: IndexError
    with pytest.raises(DatasetLayoutError, match=r"attributes.txt names 2 attributes but .*image_attribute_labels.txt "
                                                 r"uses attribute ids up to 3"):
        CUB200DataModule(str(cub_root), attributes=True, min_attribute_classes=1)


def test_images_txt_repeated_id_and_empty_file_name_images_txt(cub_root: Path) -> None:
    images = cub_root / "CUB_200_2011" / "images.txt"
    original = images.read_text().splitlines()
    edit_lines(images, lambda lines: [*lines, lines[0].split()[0] + " " + lines[1].split()[1]])
    with pytest.raises(DatasetLayoutError, match=r"images.txt:9: image id 3 is listed again \(first on line 1\)"):
        CUB200DataModule(str(cub_root))
    images.write_text("\n")  # was: IndexError
    with pytest.raises(DatasetLayoutError, match=r"images.txt' lists no image"):
        CUB200DataModule(str(cub_root))
    images.write_text("\n".join(original) + "\n")


def test_sentence_file_not_utf8_names_the_file_and_line(cub_root: Path) -> None:
    base = cub_root / "CUB_200_2011"
    for line in (base / "images.txt").read_text().splitlines():
        text = cub_root / "text_c10" / Path(line.split()[1]).with_suffix(".txt")
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_bytes("a small bird with a white belly\nthis bird has a caf\xe9 color\n".encode("latin-1"))
    with pytest.raises(DatasetLayoutError, match=r"Black_footed_Albatross_0003_3.txt:2: not UTF-8 text"):
        CUB200DataModule(str(cub_root))


def test_a_checkpoint_with_the_old_0_based_names_fits_the_same_classes_named_by_their_ids() -> None:
    """A CUB checkpoint trained before the classes without classes.txt were named by their 1-based ids holds
    "0".."C-1" for the same labels: validate / test / predict / resume refused it ("trained on classes ['0', '1',
    '2']; this run's data has ['1', '2', '3']. Give it data of those classes"), though the data is the same. Only
    that renumbering is accepted, and for CUB's data only (`renumbered`: an ImageFolder of folders 0, 1, 2 against
    one of 1, 2, 3 holds other classes, and was accepted by the first version of this rule): other names, another
    order or another shift are still refused."""
    from zoo.weights import CheckpointError, check_class_names

    check_class_names(["0", "1", "2"], ["1", "2", "3"], "ckpt", "hint", renumbered=True)
    many = [str(i) for i in range(200)]
    check_class_names(many, [str(i + 1) for i in range(200)], "ckpt", "hint", renumbered=True)
    with pytest.raises(CheckpointError, match="was trained on classes"):
        check_class_names(["0", "1", "2"], ["1", "2", "3"], "ckpt", "hint")  # not CUB: folders 0..2 vs 1..3
    for held, given in ((["1", "2", "3"], ["0", "1", "2"]),  # the other way round: not the old naming
                        (["0", "1", "2"], ["2", "3", "4"]), (["0", "1", "2"], ["1", "3", "2"]),
                        (["0", "1", "2"], ["a", "b", "c"]), (["a", "1", "2"], ["1", "2", "3"])):
        with pytest.raises(CheckpointError, match="was trained on classes"):
            check_class_names(held, given, "ckpt", "hint", renumbered=True)
