"""Reports for people: markdown and CSV tables with a higher/lower-is-better legend, the console table (full width
when piped), figures saved as PNG and written to the run's TensorBoard."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn


def metric_directions(system: nn.Module, stage: str) -> dict[str, bool | None]:
    """Logged metric name -> its torchmetrics `higher_is_better` (`ZooSystem.logged_metrics`); "<prefix>*" names
    a dict metric's entries, but for those its `entry_directions` ({entry: bool or None}) name. Entries of several
    dict metrics logged without a prefix get a direction only where those metrics agree."""
    if not hasattr(system, "logged_metrics"):
        return {}
    directions: dict[str, bool | None] = {}
    unprefixed: set[bool | None] = set()
    for name, metric in system.logged_metrics(stage):
        higher = getattr(metric, "higher_is_better", None)
        if name == "*":
            unprefixed.add(higher)
        else:
            directions[name] = higher
        if name.endswith("*"):  # entries of a dict metric with a direction of their own (None: a count)
            own = getattr(metric, "entry_directions", {})
            directions |= {name[:-1] + key: way for key, way in own.items()}
    if len(unprefixed) == 1:
        directions["*"] = unprefixed.pop()
    return directions


def direction(column: str, directions: dict[str, bool | None]) -> bool | None:
    """Whether a higher `column` is better (True / False), None where unknown. `<metric>_mean` columns take their
    metric's direction; "<prefix>*" entries of `directions` match by the longest prefix. A `<metric>_std` column
    (a spread over seeds: smaller is steadier, not better or worse) has none, unless it is itself a metric's name."""
    if column in directions:
        return directions[column]
    if column.endswith("_std"):
        return None
    name = column.removesuffix("_mean")
    if name in directions:
        return directions[name]
    patterns = [key for key in directions if key.endswith("*") and name.startswith(key[:-1])]
    return directions[max(patterns, key=len)] if patterns else None


def legend(columns: list[str], directions: dict[str, bool | None], settings: Iterable[str] = ()) -> str:
    """"higher is better: a, b; lower is better: c" for the columns whose direction is known ("" if none).
    `settings`: columns that describe a run, never a metric (an ablation's grid values, its `seeds`), which a
    direction for every column ("*": a dict metric logged without a prefix) would otherwise name."""
    parts = []
    skipped = set(settings)
    for wanted, words in ((True, "higher is better"), (False, "lower is better")):
        names = [c for c in columns if c not in skipped and direction(c, directions) is wanted]
        if names:
            parts.append(f"{words}: {', '.join(names)}")
    return "; ".join(parts)


def cell(value: Any) -> str:
    """A table cell for people: a float to 4 decimals, but never fewer than 3 significant digits, so a small
    non-zero value (a spread over seeds of 3.9e-05) never reads 0.0; files (CSV) keep full precision."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return str(round(value, max(4, 2 - math.floor(math.log10(abs(value))))))
    return str(value)


def setting_cell(value: Any) -> str:
    """A table cell of a setting (an ablation's grid value) as given, never rounded: `cell` rounds for reading
    metrics, and ema_decay 0.99999 and 0.999999 both read 1.0. Lists and mappings as JSON, the rest as `str`
    writes it (as a point's folder name does)."""
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


def markdown_table(rows: list[dict[str, Any]], settings: Iterable[str] = ()) -> str:
    """A markdown table of dict rows, columns in first-seen key order (reports and benchmark scripts); floats as
    `cell` writes them, but the `settings` columns (what describes a run, not a metric) exactly (`setting_cell`)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    exact = set(settings)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join((setting_cell if c in exact else cell)(row.get(c, "")) for c in columns)
                              + " |" for row in rows])


def print_table(title: str, rows: list[dict[str, Any]], caption: str, settings: Iterable[str] = ()) -> None:
    """A rich table on a terminal; plain markdown (never cut to 80 columns) when the output is piped or a file.
    `settings`: columns written exactly, not rounded (see `markdown_table`)."""
    exact = set(settings)
    if not sys.stdout.isatty():
        print(f"\n{title}\n\n{markdown_table(rows, exact)}" + (f"\n\n{caption}" if caption else ""), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title=title, caption=caption or None)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*((setting_cell if c in exact else cell)(row.get(c, "")) for c in columns))
    Console().print(table)


def write_report(folder: Path, tables: dict[str, list[dict[str, Any]]],
                 directions: dict[str, bool | None] | None = None, stem: str = "report",
                 settings: Iterable[str] = ()) -> None:
    """<stem>.md (one section per table, each with its higher/lower-is-better legend; numbers as `cell` writes
    them), <stem>.csv (the first table) and <table>.csv in full precision; tables printed. `settings`: columns that
    are no metric: they get no direction (see `legend`) and are written as given, not rounded (`setting_cell`)."""
    settings = list(settings)
    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for index, (title, rows) in enumerate(tables.items()):
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for path in dict.fromkeys(([folder / f"{stem}.csv"] if index == 0 else []) + [folder / f"{title}.csv"]):
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(rows)
        numeric = [c for c in columns if any(isinstance(row.get(c), (int, float)) for row in rows)]
        caption = legend(numeric, directions or {}, settings)  # a run's name is never "better", even under "*"
        sections.append(f"## {title}\n\n{markdown_table(rows, settings)}" + (f"\n\n{caption}" if caption else ""))
        print_table(f"{folder}: {title}", rows, caption, settings)
    (folder / f"{stem}.md").write_text("\n\n".join(sections) + "\n")
