"""Bad input to the text loaders is refused with the file, the line and what to do, never read as other data:
CSVTextDataModule's unquoted delimiters, rows without a text and stray quotes that merge rows; IMDBDataModule's
val_fraction out of range."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from datamodules import CSVTextDataModule, DatasetLayoutError, DataSettingError, IMDBDataModule
from datamodules.text import read_table
from tests.helpers import REVIEWS, write_table

SETTINGS = {"label_column": "category", "max_len": 6, "max_vocab": 30}


def table(path: Path, lines: list[str], delimiter: str) -> Path:
    """A table of `lines` (label, delimiter, text as written) after the header "category<delimiter>text": the lines
    of REVIEWS come first (lines 2 to 41), then `lines` (line 42 on)."""
    good = [f'{label}{delimiter}"{text}"' for label, text in REVIEWS]
    path.write_text("\n".join([f"category{delimiter}text", *good, *lines]) + "\n")
    return path


@pytest.mark.parametrize("name, delimiter", [("rt.csv", ","), ("rt.tsv", "\t")])
def test_an_unquoted_delimiter_in_a_text_is_refused_naming_the_line(tmp_path: Path, name: str,
                                                                   delimiter: str) -> None:
    """"rotten,Dull, slow and tedious." trained as the one word "dull": csv put " slow and tedious." under a column
    of its own, which nothing read."""
    path = table(tmp_path / name, ["fresh" + delimiter + "Great.", f"rotten{delimiter}Dull{delimiter} slow."],
                 delimiter)
    shown = "a comma" if delimiter == "," else "a tab"
    message = rf"{name}': 1 line\(s\) hold more fields than the header's 2 .* lines 43 .*line 43 reads as \['rotten', " \
              rf"'Dull', ' slow.'\]. A text holding {shown} must be quoted whole"
    with pytest.raises(DatasetLayoutError, match=message):
        CSVTextDataModule(path, labels=["rotten", "fresh"], **SETTINGS).setup()
    with pytest.raises(DatasetLayoutError, match=message):  # `labels: null` reads the file when built
        CSVTextDataModule(path, **SETTINGS)
    # a trailing delimiter (an empty field past the header) loses nothing: read as before
    table(path, ["fresh" + delimiter + "Great." + delimiter], delimiter)
    data = CSVTextDataModule(path, labels=["rotten", "fresh"], **SETTINGS)
    data.setup()
    assert sum(len(split) for split in data.splits.values()) == 33


@pytest.mark.parametrize("line", ["fresh", "rotten,", 'rotten,"  "'])
def test_a_row_without_a_text_is_refused_naming_the_line(tmp_path: Path, line: str) -> None:
    """A row without a text (a short line, an empty or blank field) became a sample of padding alone that kept its
    label."""
    path = table(tmp_path / "rt.csv", ["fresh,Great.", "", line], ",")  # line 43 blank: the row is on line 44
    for labels in (["rotten", "fresh"], None):
        with pytest.raises(DatasetLayoutError, match=r"rt.csv': 1 line\(s\) with a kept label have no text in "
                                                     r"column 'text' .*: lines 44 \(the header is line 1\)"):
            CSVTextDataModule(path, labels=labels, **SETTINGS).setup()


@pytest.mark.parametrize("name, delimiter", [("rt.tsv", "\t"), ("rt.csv.gz", ",")])
def test_a_stray_quote_merging_rows_is_refused_naming_the_line_it_opens(tmp_path: Path, name: str,
                                                                      delimiter: str) -> None:
    """A text opening with a " it does not close swallowed the rows after it, up to the next ", into its own text
    (their labels lost). Quoted as the layout says (csv's quoting, .tsv
    too), a text may still hold a line break or a " and is read as written."""
    lines = [f'fresh{delimiter}"Wonderful, and then some.', f"rotten{delimiter}Dull and tedious.",
             f"fresh{delimiter}Great.", f'rotten{delimiter}"Boring" said everyone.', f"rotten{delimiter}Bad."]
    raw = table(tmp_path / "plain", lines, delimiter).read_bytes()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    message = (rf"{name}': 1 quoted field\(s\) run on over lines that read as rows of their own, opening on lines "
               r"42 \(the header is line 1\): the field opening on line 42 holds line 43, 'rotten(\\t|,)Dull and "
               r"tedious.'. A stray \" opening a text")
    with pytest.raises(DatasetLayoutError, match=message):
        CSVTextDataModule(path, labels=["rotten", "fresh"], **SETTINGS).setup()
    with pytest.raises(DatasetLayoutError, match=message):
        CSVTextDataModule(path, **SETTINGS)
    # the stray quote doubled inside a text quoted whole, and a quoted text over two lines: read as written
    lines[0] = f'fresh{delimiter}"""Wonderful, and then some."'
    lines.append(f'fresh{delimiter}"A moving film.\nGreat cast, great story."')
    raw = table(tmp_path / "plain", lines, delimiter).read_bytes()
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    data = CSVTextDataModule(path, labels=["rotten", "fresh"], **SETTINGS, val_fraction=0.2, test_fraction=0.2)
    data.setup()
    assert sum(len(split) for split in data.splits.values()) == 32 + 6
    assert [row["text"] for row in read_table(path, ["text"])][40:] == [
        '"Wonderful, and then some.', "Dull and tedious.", "Great.", "Boring said everyone.", "Bad.",
        "A moving film.\nGreat cast, great story."]


@pytest.mark.parametrize("val_fraction", [-0.5, 0.0, 1.5, float("nan")])
def test_imdb_val_fraction_out_of_range_is_refused(imdb_root: Path, val_fraction: float) -> None:
    """val_fraction=-0.5 or 0 held out one review for validation, silently (max(1, round(...))). (1 is taken: the
    empty training split's error names it.)"""
    with pytest.raises(DataSettingError, match=rf"IMDBDataModule: val_fraction must be in \(0, 1\] .*; got "
                                               rf"{val_fraction}\."):
        IMDBDataModule(imdb_root, max_vocab=50, val_fraction=val_fraction)


def test_a_quoted_text_with_one_line_that_reads_as_a_row_is_read_as_written(tmp_path: Path) -> None:
    """Texts csv.writer writes: "Long trip.\n1,500 miles for this?" has a line that splits as label 1 and a text,
    and an empty label (a row dropped with `labels` given) made "" a known label. One such line is warned of and
    read as written, not refused as a stray quote (see above, and the next test for two or more)."""
    import csv

    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text"])
        writer.writerows([(str(1 + i % 2), text) for i, (_, text) in enumerate(REVIEWS)])
        writer.writerow(["1", "Good\u2028film\x85 said the critic."])  # line breaks csv does not count as lines
        writer.writerow(["2", "Long trip to see it.\n1,500 miles for this?\nNever again."])
        writer.writerow(["", "this film was long,\nno label"])
    with pytest.warns(UserWarning, match=r"1 quoted text\(s\) hold a line that reads as a row of its own, opening on "
                                         r"lines 43 .* holds line 44, '1,500 miles for this\?'. Read as written"):
        data = CSVTextDataModule(path, labels=["1", "2"], **SETTINGS, val_fraction=0.2, test_fraction=0.2)
        data.setup()
    assert sum(len(split) for split in data.splits.values()) == len(REVIEWS) + 2


def test_a_quoted_text_with_several_lines_that_read_as_rows_is_read_as_written(tmp_path: Path) -> None:
    """csv.writer quotes "Scores I gave:\nStory,4\nActing,5" whole, as csv quotes: it was refused as a stray quote
    swallowing two rows (with no setting to read the file), and a line of fewer fields than the header ("Story,4"
    under three columns) counted as a row once padded to the header's length."""
    import csv

    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "rating", "source"])
        writer.writerows([(text, str(1 + i % 5), "web") for i, (_, text) in enumerate(REVIEWS)])
        writer.writerow(["Scores I gave:\nStory,4,web\nActing,5,web\nGood overall.", "4", "web"])
        writer.writerow(["Short:\nStory,4\nActing,5", "3", "web"])  # two fields under three columns: no row
    with pytest.warns(UserWarning, match=r"^(?!.*opening on lines \d+, \d+).*1 quoted text\(s\) hold a line that "
                                         r"reads as a row of its own, opening on lines 42 .* holds line 43, "
                                         r"'Story,4,web'"):
        data = CSVTextDataModule(path, **{**SETTINGS, "label_column": "rating"}, val_fraction=0.2,
                                 test_fraction=0.2)
        data.setup()
    assert sum(len(split) for split in data.splits.values()) == len(REVIEWS) + 2
    assert [row["text"] for row in read_table(path, ["text"])][-2:] == [
        "Scores I gave:\nStory,4,web\nActing,5,web\nGood overall.", "Short:\nStory,4\nActing,5"]


def test_a_stray_quote_closing_at_a_lines_end_is_refused(tmp_path: Path) -> None:
    """A stray quote closing at a line's end ('my 55 inch TV"') parses under csv's strict quoting, but its record
    lacks the label csv.writer writes: five reviews were merged into one label-less text (dropped with `labels`
    given) with a mere warning once strict parsing decided alone."""
    rows = [f'"{text}",{label}' for label, text in REVIEWS[:10]]
    rows += ['"review ten bad dull,rotten', "Loved it,fresh", "Boring plot,rotten", "Great cast,fresh",
             'my 55 inch TV"', *(f'"{text}",{label}' for label, text in REVIEWS[10:20])]
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"1 quoted field\(s\) run on .* opening on lines 12 .* holds line 13, "
                                                 r"'Loved it,fresh'"):
        CSVTextDataModule(path, **{**SETTINGS, "label_column": "label"}, labels=["rotten", "fresh"]).setup()


def test_a_stray_quote_swallowing_one_row_is_refused(tmp_path: Path) -> None:
    """A stray quote that swallowed one row of a label the file uses once ("synopsis") was only warned of, the two
    rows read as one text: where the quoted field closes mid-text ('Wonderful" acting.'), as csv.writer never
    writes, it is refused."""
    path = table(tmp_path / "rt.csv", ['rotten,"Dull and tedious.', "synopsis,A man walks.",
                                       'fresh,Wonderful" acting.', "rotten,Too long."], ",")
    with pytest.raises(DatasetLayoutError, match=r"1 quoted field\(s\) run on .* opening on lines 42 .* holds line 44, "
                                                 r"'fresh,Wonderful acting.'"):
        CSVTextDataModule(path, labels=["rotten", "fresh"], **SETTINGS).setup()
