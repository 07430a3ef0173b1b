"""How much part IoU can any parse tree win over the uniform grid on the scene world? Scored on the true boxes.

    python -m benchmarks.aog_rcnn_parse_headroom [--grid 3 3] [--num_train 600] [--num_val 150] [--seed 0]
        [--shared_part_types] [--device cpu|cuda]

Every object of the scene world's validation split is taken with its true box (a perfect detector), and every
partition the grid grammar's parse trees make (1,241 trees at 3x3) is scored with the parse-part IoU of
`zoo.aog_rcnn.metrics` (mean of part recall and leaf precision against the true part boxes); trees with the same
leaves count once. Rows:
- whole box and uniform grid: the two fixed partitions the detection System also logs;
- best fixed tree per class: for each class the one tree with the highest mean score on the training split,
  applied to every validation object of that class (what a detector that learned one configuration per class could
  reach: the paper's "latent part configuration");
- best tree per object: the oracle, chosen on the validation objects themselves (an upper bound, not reachable
  without the part boxes).
The gap between the grid and the per-class row is the headroom issue 5's "parse leaves above the uniform grid"
has on this world.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.devices import add_device_argument
from datamodules import PartsWorldScenesDataModule
from zoo.aog_rcnn.metrics import pairwise_iou, partition_scores
from zoo.aog_rcnn.model import AOGParsing, GridGrammar
from zoo.cli.report import markdown_table


def tree_scores(boxes: torch.Tensor, part_boxes: torch.Tensor, parser: AOGParsing, trees: torch.Tensor,
                chunk: int = 64) -> torch.Tensor:
    """Parse-part IoU of every tree for every object: boxes (N, 4), part_boxes (N, P, 4), trees (M, T) -> (N, M)."""
    out = []
    for start in range(0, len(boxes), chunk):  # chunks of objects bound the (n, P, M, T) recall tensor
        leaves = parser.leaf_boxes(boxes[start:start + chunk].float())  # (n, T, 4)
        iou = pairwise_iou(part_boxes[start:start + chunk].float(), leaves)  # (n, P, T)
        recall, precision = partition_scores(iou, trees.expand(len(iou), -1, -1))  # (n, M) each
        out.append((recall + precision) / 2)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=2, default=[3, 3])
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument("--num_val", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared_part_types", action="store_true", help="the layout-only world (see make_world)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    data = PartsWorldScenesDataModule(num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                                      shared_part_types=args.shared_part_types)
    data.setup("fit")
    grammar = GridGrammar(*args.grid)
    aog = AOGParsing(grammar).to(args.device)
    trees = grammar.partitions().to(args.device)
    grid_tree = int((trees == aog.uniform_leaves()).all(1).nonzero())
    box_tree = int((trees == aog.whole_box_leaves()).all(1).nonzero())
    scores, labels = {}, {}
    for split in ("train", "val"):
        objects = data.splits[split].objects
        scores[split] = tree_scores(objects["box"].to(args.device), objects["part_boxes"].to(args.device), aog,
                                    trees)  # (N, M)
        labels[split] = objects["label"].to(args.device)
    classes = int(labels["train"].max()) + 1
    per_class = torch.stack([scores["train"][labels["train"] == c].mean(0) for c in range(classes)]).argmax(1)  # (C,)
    val = scores["val"]
    chosen = per_class[labels["val"]]  # (N,) each object's class tree
    leaves = trees.sum(1).float()
    rows = [
        {"partition": "whole box", "part_iou": val[:, box_tree].mean(), "leaves": 1.0},
        {"partition": "uniform grid", "part_iou": val[:, grid_tree].mean(), "leaves": float(leaves[grid_tree])},
        {"partition": "best fixed tree per class (chosen on train)",
         "part_iou": val.gather(1, chosen[:, None]).mean(), "leaves": float(leaves[chosen].mean())},
        {"partition": "best tree per object (oracle)", "part_iou": val.max(1).values.mean(),
         "leaves": float(leaves[val.argmax(1)].mean())},
    ]
    rows = [{**r, "part_iou": round(float(r["part_iou"]), 4), "leaves": round(r["leaves"], 2)} for r in rows]
    print(f"{len(trees)} partitions ({grammar.num_parse_trees} parse trees) of the {args.grid[0]}x{args.grid[1]} grid; "
          f"{len(val)} validation objects with their true boxes")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
