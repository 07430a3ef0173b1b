"""Reports for people: markdown and CSV tables, the console table, explanation figures."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch


def save_explanation_figure(path: Path, images: torch.Tensor, maps: dict[str, torch.Tensor], count: int = 6) -> None:
    """One row per explainer over the first `count` images (red = important)."""
    from torchvision.utils import save_image

    from zoo.engine.callbacks import heatmap_overlay

    images = images[:count].float().cpu()
    saliency = torch.stack([m[:count].float().cpu() for m in maps.values()])  # (M, N, H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(heatmap_overlay(images, saliency).flatten(0, 1), path, nrow=len(images))
    path.with_suffix(".md").write_text("rows, top to bottom: " + ", ".join(maps) + "\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of dict rows, columns in first-seen key order (reports and benchmark scripts)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows])


def write_report(folder: Path, tables: dict[str, list[dict[str, Any]]], stem: str = "report") -> None:
    """<stem>.md (one section per table), <stem>.csv (the first table) and <table>.csv; tables printed."""
    from rich.console import Console
    from rich.table import Table

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    for index, (title, rows) in enumerate(tables.items()):
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for path in dict.fromkeys(([folder / f"{stem}.csv"] if index == 0 else []) + [folder / f"{title}.csv"]):
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(rows)
        sections.append(f"## {title}\n\n{markdown_table(rows)}")
        table = Table(title=f"{folder}: {title}")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row.get(c, "")) for c in columns))
        Console().print(table)
    (folder / f"{stem}.md").write_text("\n\n".join(sections) + "\n")
