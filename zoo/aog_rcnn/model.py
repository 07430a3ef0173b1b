"""AOG-parsed R-CNN: an AND-OR grammar over the RoI grid replaces RoI pooling (Wu et al., arXiv 1711.05226).

Faithful: the grid grammar (one OR-node and one terminal per sub-rectangle, one AND-node per horizontal or vertical
cut, nodes shared so the graph is a DAG); the AOGParsing operator on position-sensitive maps of an R-FCN-style
head (terminal = area-weighted mean of the cells it covers, AND = area-weighted mean of its two children, OR = mean
while folding, max while unfolding); the best parse tree of every detection, kept through post-processing, as its
extractive rationale; torchvision's losses, no parse loss.

Departs / chooses (the authors' detector code was never released):
- `terminal_maps="terminals"` (default) gives every terminal node its own (C+1) position-sensitive maps pooled over
  its sub-box of the RoI (the spec's "one map per terminal node" option). With `"cells"` the terminals share the
  R-FCN cell maps and add no parameters, but then every parse tree scores exactly the average vote (an area-weighted
  mean of cell means is the mean of all cells), so the OR choices are ties and the parse says nothing: kept as the
  sanity check against R-FCN, not as a rationale. `terminal_rank=r` reads every terminal's maps from r shared basis
  maps (weights of rank <= r): at r = 32 the head costs about the average vote's, but parses worse (README).
- Box regression is class-agnostic and position-sensitive (R-FCN): 4 x H x W maps voted by the mean.
- The bottom-up pass loops over waves of rectangles of one height + width (H + W - 1 of them), never over nodes,
  RoIs or classes. `dp_kernel="triton"` runs each wave as one Triton kernel forward and one backward on CUDA
  (`zoo.aog_rcnn.kernels`; opt-in until measured on a GPU; the waves are its reference in tests).

Baselines on the same backbone, RPN, proposals and budget: `vote_rcnn_*` (R-FCN average vote) and
`faster_rcnn_*` (torchvision MultiScaleRoIAlign + TwoMLPHead + FastRCNNPredictor).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, ps_roi_align

from datamodules._base import pretrained_normalization
from zoo.aog_rcnn import kernels
from zoo.backbones import TINY_CNN, Backbone
from zoo.checks import check_input, ids_out_of_range
from zoo.registry import input_size_aware, register_model

OR_MODES = ("mean", "max")
DP_KERNELS = ("waves", "triton")  # the DP's waves as PyTorch ops (everywhere) or as Triton kernels (CUDA)
TERMINAL_MAPS = ("terminals", "cells")
ENUMERATED_TREES = 4096  # grids with at most this many parse trees (3x3: 1,241) score every partition in training


def folded_parse_warning(owner: str) -> str:
    """What a folding detector's parse trees are, said where they are reported (`AOGRCNN.forward` in eval mode,
    `AOGRCNNSystem` at fit end): folding (OR = mean) scores a class by the mean over every parse tree, so the tree a
    detection reports (each OR's best child under the folded scores) is not one that scored it. `owner` names the
    model or run."""
    return (f"{owner} is folding (or_mode='mean'): a class scores the mean over every parse tree, so a detection's "
            f"parse_leaves (each OR-node's best child under the folded scores) are not the parse tree that scored it. "
            f"Train it to unfold (OR = max, the best tree scores): AOGRCNNSystem's unfold_epoch (its default 'half' "
            f"unfolds for the second half of max_epochs), or set the model's or_mode='max' "
            f"(zoo.create_model(..., or_mode='max'), model.or_mode = 'max'), which changes a folded model's scores.")


# ----------------------------------------------------------------------------------------------------- grammar
@dataclass(frozen=True)
class GridGrammar:
    """The AND-OR grammar over an H x W grid, compiled to index tensors.

    Nodes are indexed by sub-rectangle: OR-node i and terminal i both cover `rects[i]` = (top, left, height, width),
    sorted by area so that every area level is a contiguous range. AND-node j splits the rectangle of its parent OR
    `and_parent[j]` into OR-children `and_left[j]` (top / left part) and `and_right[j]`.
    """

    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"The grid needs at least one cell per side; got {self.height} x {self.width}.")

    @cached_property
    def rects(self) -> list[tuple[int, int, int, int]]:
        h, w = self.height, self.width
        every = [(t, l, rh, rw) for rh in range(1, h + 1) for rw in range(1, w + 1)
                 for t in range(h - rh + 1) for l in range(w - rw + 1)]
        return sorted(every, key=lambda r: (r[2] * r[3], r[2], r[0], r[1]))

    @cached_property
    def _and_nodes(self) -> list[tuple[int, int, int]]:
        """(parent, left, right) per AND-node, in the order of their parents (so per level contiguous)."""
        index = {r: i for i, r in enumerate(self.rects)}
        nodes = []
        for parent, (t, l, h, w) in enumerate(self.rects):  # runs once when the grammar is built
            nodes += [(parent, index[(t, l, k, w)], index[(t + k, l, h - k, w)]) for k in range(1, h)]
            nodes += [(parent, index[(t, l, h, k)], index[(t, l + k, h, w - k)]) for k in range(1, w)]
        return nodes

    @property
    def num_terminals(self) -> int:
        return len(self.rects)

    @property
    def num_or(self) -> int:
        return len(self.rects)

    @property
    def num_and(self) -> int:
        return len(self._and_nodes)

    @property
    def root(self) -> int:
        return self.num_or - 1  # the whole grid: the only rectangle of the largest area

    @cached_property
    def num_parse_trees(self) -> int:
        """Number of distinct parse trees (derivations) from the root (Python integers: exact)."""
        counts = [1] * self.num_or
        for parent, left, right in self._and_nodes:  # parents come in increasing area, children before parents
            counts[parent] += counts[left] * counts[right]
        return counts[self.root]

    def partitions(self) -> torch.Tensor:
        """The distinct leaf sets of all parse trees: (num_partitions, T) bool over the terminals, sorted. Several
        derivations can give one partition (the four cells of a 2x2 block: cut rows first or columns first), so
        there are fewer partitions than parse trees (3x3: 320 of 1,241). Enumerated, so small grids only."""
        index = {r: i for i, r in enumerate(self.rects)}

        @functools.lru_cache(maxsize=None)
        def trees(top: int, left: int, h: int, w: int) -> frozenset[frozenset[int]]:
            out = {frozenset([index[(top, left, h, w)]])}
            for k in range(1, h):
                out |= {a | b for a in trees(top, left, k, w) for b in trees(top + k, left, h - k, w)}
            for k in range(1, w):
                out |= {a | b for a in trees(top, left, h, k) for b in trees(top, left + k, h, w - k)}
            return frozenset(out)

        leaves = trees(0, 0, self.height, self.width)
        masks = torch.zeros(len(leaves), self.num_terminals, dtype=torch.bool)
        for row, tree in enumerate(leaves):
            masks[row, list(tree)] = True
        return masks.unique(dim=0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Index tensors for AOGParsing: rect table, cell weights, each AND's parent OR, its slot there, its children
        and their weights, OR -> AND table."""
        rects = torch.tensor(self.rects)  # (T, 4) top, left, height, width
        area = rects[:, 2] * rects[:, 3]
        rows, cols = torch.arange(self.height), torch.arange(self.width)
        inside_rows = (rows >= rects[:, :1]) & (rows < rects[:, :1] + rects[:, 2:3])  # (T, H)
        inside_cols = (cols >= rects[:, 1:2]) & (cols < rects[:, 1:2] + rects[:, 3:4])  # (T, W)
        cover = (inside_rows[:, :, None] & inside_cols[:, None, :]).flatten(1).float()  # (T, H*W)
        ands = torch.tensor(self._and_nodes, dtype=torch.long).reshape(-1, 3)  # (A, 3)
        parent, left, right = ands.T.contiguous()  # contiguous rows: the Triton kernels read them by pointer
        left_weight = area[left].float() / area[parent].float()
        # OR -> its AND children, padded with -1: (num_or, max_and_children)
        per_or = torch.bincount(parent, minlength=self.num_or)
        slot = torch.arange(len(parent)) - (torch.cumsum(per_or, 0) - per_or)[parent]
        children = torch.full((self.num_or, max(int(per_or.max()) if len(parent) else 0, 1)), -1, dtype=torch.long)
        children[parent, slot] = torch.arange(len(parent))
        return {"rects": rects, "area": area, "cell_weights": cover / area[:, None].float(), "and_parent": parent,
                "and_slot": slot, "and_left": left, "and_right": right, "and_left_weight": left_weight,
                "or_and_children": children, "or_num_children": per_or + 1}

    def levels(self) -> list[tuple[int, int]]:
        """(or_start, or_end) per area level, in increasing area (rects are sorted by area)."""
        areas = [h * w for _, _, h, w in self.rects]
        return [(areas.index(a), len(areas) - areas[::-1].index(a)) for a in sorted(set(areas))]


# ------------------------------------------------------------------------------------------------- AOGParsing
class AOGParsing(nn.Module):
    """Bottom-up scores of the grid grammar and top-down best parse trees, batched over rows (RoI x class).

    forward(terminal_scores (R, T)) -> (root scores (R,), OR choices (R, num_or) uint8: 0 = the terminal, j > 0 =
    the j-th AND child). `or_mode` "mean" folds (integrates every configuration), "max" unfolds (best tree).
    """

    def __init__(self, grammar: GridGrammar, or_mode: str = "max", dp_kernel: str = "waves") -> None:
        super().__init__()
        if dp_kernel not in DP_KERNELS:
            raise ValueError(f"dp_kernel must be one of {DP_KERNELS}; got {dp_kernel!r}.")
        if grammar.height * grammar.width < 2:
            raise ValueError("AOGParsing needs a grid of at least two cells: a 1x1 grid has one parse, the cell.")
        if dp_kernel == "triton" and not kernels.available():  # the same function either way: a checkpoint loads
            warnings.warn("dp_kernel='triton': Triton is not installed here, the DP runs its PyTorch waves.")
        self.grammar = grammar
        self.or_mode = or_mode
        self.dp_kernel = dp_kernel
        for name, tensor in grammar.tensors().items():
            self.register_buffer(name, tensor, persistent=False)
        self.levels: list[tuple[int, int]] = grammar.levels()  # OR range per area level (`parse_leaves`)
        self._schedule_waves()
        self._root_weights()

    def _schedule_waves(self) -> None:
        """The DP's schedule: waves of the ORs whose rectangles have the same height + width. Each AND child of an
        h x w rectangle has a smaller height + width, so a wave needs only earlier waves, and each OR of a wave has
        the same h + w - 2 AND children (no padded slots). That is H + W - 1 waves against one per distinct area
        (7x7: 13 against 25), each the same few kernels on a GPU. The DP keeps its node table in wave order: node
        `wave_order[i]` at row i; the slot tables below point at rows of that table."""
        size = self.rects[:, 2] + self.rects[:, 3]  # (num_or,) height + width
        order = torch.sort(size, stable=True).indices  # wave row -> OR id
        row = torch.empty_like(order)
        row[order] = torch.arange(len(order))  # OR id -> wave row
        slots = self.or_and_children[order].clamp(min=0)  # (num_or, K) AND ids (padding reads AND 0, never used)
        left, right, weight = row[self.and_left[slots]], row[self.and_right[slots]], self.and_left_weight[slots]
        for name, tensor in {
            "wave_order": order, "wave_row": row,
            "wave_children": torch.stack([left, right], 1),  # (num_or, 2, K): both OR children of each AND slot
            "wave_split": torch.stack([weight, 1 - weight], 1),  # (num_or, 2, K): the share of each child
            "wave_num_children": self.or_num_children[order],
            "slot_ids": torch.arange(1, left.shape[1] + 1, dtype=torch.uint8)[:, None],  # (K, 1): choice j = slot j
        }.items():
            self.register_buffer(name, tensor, persistent=False)
        self.wave_root = int(row[self.grammar.root])
        # the Triton kernels read the AND tables in OR-id order as a CSR list: the AND ids come grouped by their OR
        # (`GridGrammar.tensors` numbers them so), so slot j of OR o is AND or_and_start[o] + j
        if not torch.equal(self.or_and_children[self.or_and_children >= 0], torch.arange(len(self.and_left))):
            raise RuntimeError("AOGParsing needs the AND nodes numbered OR by OR, in slot order.")
        self.register_buffer("or_and_start", F.pad((self.or_num_children - 1).cumsum(0), (1, 0)), persistent=False)
        self.kernel_slots = 1 << max(int(self.or_num_children.max()) - 2, 0).bit_length()
        # every OR's parents, for the Triton backward's pull: the ANDs that have it as their left or right child
        child = torch.cat([self.and_left, self.and_right])
        by_child = torch.sort(child, stable=True).indices
        per_or = torch.bincount(child, minlength=self.grammar.num_or)
        for name, tensor in {
            "or_parent_start": F.pad(per_or.cumsum(0), (1, 0)),
            "or_parent": self.and_parent.repeat(2)[by_child].contiguous(),
            "or_parent_slot": self.and_slot.repeat(2)[by_child].contiguous(),  # the AND's slot in its parent OR
            "or_parent_share": torch.cat([self.and_left_weight, 1 - self.and_left_weight])[by_child].contiguous(),
        }.items():
            self.register_buffer(name, tensor, persistent=False)
        self.kernel_parents = 1 << max(int(per_or.max()) - 1, 0).bit_length()
        self.waves: list[tuple[int, int, int]] = []  # (first row, end row, AND children of each OR) per wave
        sorted_size = size[order].tolist()
        for value in sorted(set(sorted_size)):
            w0, w1 = sorted_size.index(value), len(sorted_size) - sorted_size[::-1].index(value)
            children = self.wave_num_children[w0:w1] - 1
            if not bool((children == value - 2).all()):  # the grammar's every binary split, and nothing else
                raise RuntimeError(f"AOGParsing's wave schedule needs h + w - 2 AND children per h x w OR; "
                                   f"the wave h + w = {value} has {sorted(set(children.tolist()))}.")
            self.waves.append((w0, w1, value - 2))

    def _root_weights(self) -> None:
        """The root score as linear maps of the terminal scores, for `root_scores`: folding, the one (T,) vector the
        mean DP applies (the DP run on the identity, in float64); unfolding, on grids of at most ENUMERATED_TREES
        parse trees, every partition's leaf areas over the grid's, (P, T): each parse tree scores its leaves' terminal
        scores weighted by their area (nested area-weighted ANDs), and the max DP scores the best tree."""
        identity = torch.eye(self.grammar.num_terminals, dtype=torch.float64)
        self.register_buffer("fold_weights", self.bottom_up(identity, maximise=False)[0].float(), persistent=False)
        partitions = (self.grammar.partitions().float() * self.area / self.area.max() if
                      self.grammar.num_parse_trees <= ENUMERATED_TREES else None)
        self.register_buffer("partition_weights", partitions, persistent=False)

    def root_scores(self, terminal_scores: torch.Tensor) -> torch.Tensor:
        """The root scores (R,) alone, without OR choices, as autograd ops: what training needs, at a few kernels
        where the DP launches a few per wave. Folding: one matrix-vector product with `fold_weights`. Unfolding, on
        a GPU and a grid with `partition_weights` (3x3 and smaller): `best_partition_scores`. Otherwise the DP: on a
        CPU, launches cost little and the DP's arithmetic is a hundredth of scoring every partition. In float32
        (float64 stays) also under autocast; the same scores as `forward`'s up to float rounding."""
        if self.or_mode == "max":
            if self.partition_weights is None or terminal_scores.device.type == "cpu":
                return self(terminal_scores)[0]
            return self.best_partition_scores(terminal_scores)
        return self._linear_root(terminal_scores, lambda scores: scores @ self.fold_weights.to(scores.dtype))

    def best_partition_scores(self, terminal_scores: torch.Tensor) -> torch.Tensor:
        """The unfolding root score as the best partition's (R,): every partition's score in one matmul, then their
        max, whose gradient reaches the best partition's leaves (the DP's gradient of its best tree)."""
        return self._linear_root(terminal_scores,
                                 lambda scores: (scores @ self.partition_weights.to(scores.dtype).T).max(1).values)

    def _linear_root(self, terminal_scores: torch.Tensor, score: Any) -> torch.Tensor:
        """`score` of the terminal scores checked and in float32 (or float64), autocast off; in their dtype."""
        check_input(f"AOGParsing over a {self.grammar.height}x{self.grammar.width} grid", terminal_scores,
                    ("rows", self.grammar.num_terminals), "terminal scores")
        with torch.autocast(terminal_scores.device.type, enabled=False):
            root = score(terminal_scores.to(torch.promote_types(terminal_scores.dtype, torch.float32)))
        return root.to(terminal_scores.dtype)

    @property
    def or_mode(self) -> str:
        return self._or_mode

    @or_mode.setter
    def or_mode(self, mode: str) -> None:
        if mode not in OR_MODES:
            raise ValueError(f"or_mode must be one of {OR_MODES} (folding, unfolding); got {mode!r}.")
        self._or_mode = mode

    def terminal_from_cells(self, cell_scores: torch.Tensor) -> torch.Tensor:
        """(R, H*W) cell scores -> (R, T) terminal scores, each the mean of the cells its rectangle covers."""
        return cell_scores @ self.cell_weights.to(cell_scores.dtype).T

    def forward(self, terminal_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_input(f"AOGParsing over a {self.grammar.height}x{self.grammar.width} grid", terminal_scores,
                    ("rows", self.grammar.num_terminals), "terminal scores")
        root, choices = _GrammarDP.apply(terminal_scores, self, self.or_mode == "max")
        return root, choices

    def runs_triton(self, terminal_scores: torch.Tensor) -> bool:
        """Whether the DP runs as Triton kernels (`zoo.aog_rcnn.kernels`): with `dp_kernel="triton"`, on
        CUDA, for float16, bfloat16 and float32 scores. Otherwise the PyTorch waves run (the reference)."""
        return (self.dp_kernel == "triton" and terminal_scores.is_cuda and kernels.available()
                and terminal_scores.dtype in (torch.float32, torch.bfloat16, torch.float16))

    @property
    def kernel_tables(self) -> dict[str, Any]:
        """The grammar as the Triton kernels read it: the schedule (OR ids, children first) and its waves (first and
        end row), each OR's first AND, every AND's two OR children and the left one's share, "slots": a power of two
        >= the most AND children of an OR (the forward's block of children); for the backward, each OR's parents
        (a CSR list by OR id: parent OR, the AND's slot in it, this child's share) and "parents", a power of two >=
        the most parents of an OR."""
        return {"order": self.wave_order, "start": self.or_and_start, "left": self.and_left,
                "right": self.and_right, "weight": self.and_left_weight, "slots": self.kernel_slots,
                "waves": [(w0, w1) for w0, w1, _ in self.waves], "parent_start": self.or_parent_start,
                "parent_or": self.or_parent, "parent_slot": self.or_parent_slot, "parent_share": self.or_parent_share,
                "parents": self.kernel_parents}

    def choices_by_or(self, wave_choices: torch.Tensor) -> torch.Tensor:
        """OR choices in wave order (num_or, R) -> by OR id, (R, num_or)."""
        return wave_choices.index_select(0, self.wave_row).T

    def bottom_up(self, terminal_scores: torch.Tensor, maximise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The DP without autograd: root scores (R,) and OR choices (num_or, R) uint8 in wave order (the best child,
        also when folding; `choices_by_or` orders them by OR id). Wave by wave (`_schedule_waves`), both OR children
        of every AND slot are gathered at once and their AND scores written straight into a (n, 1 + k, R) candidate
        block beside each OR's terminal (slot j = the OR's j-th AND child), so the OR is one reduction over the
        block, written in place into the node tables: five kernels per wave when maximising."""
        terminals = terminal_scores.T.index_select(0, self.wave_order)  # (T, R) in wave order
        rows = terminals.shape[1]
        or_scores = terminals.new_empty(self.grammar.num_or, rows)
        choices = torch.zeros(self.grammar.num_or, rows, dtype=torch.uint8, device=terminals.device)
        split = self.wave_split.to(terminals.dtype)
        for w0, w1, k in self.waves:
            if k == 0:  # single cells: the terminal is the only child
                or_scores[w0:w1] = terminals[w0:w1]
                continue
            n = w1 - w0
            candidates = terminals.new_empty(n, 1 + k, rows)
            candidates[:, 0] = terminals[w0:w1]
            children = or_scores.index_select(0, self.wave_children[w0:w1, :, :k].flatten()).view(n, 2, k, rows)
            weight = split[w0:w1, 0, :k, None]
            torch.lerp(children[:, 1], children[:, 0], weight, out=candidates[:, 1:])  # w left + (1 - w) right
            if maximise:
                best = torch.empty(n, rows, dtype=torch.long, device=terminals.device)
                torch.max(candidates, 1, out=(or_scores[w0:w1], best))
            else:
                best = candidates.argmax(1)
                torch.sum(candidates, 1, out=or_scores[w0:w1]).div_(self.wave_num_children[w0:w1, None])
            choices[w0:w1] = best  # one copy, cast to uint8
        return or_scores[self.wave_root].clone(), choices

    def top_down_gradient(self, grad_root: torch.Tensor, choices: torch.Tensor, maximise: bool) -> torch.Tensor:
        """d(root)/d(terminals) times grad_root: (R,) -> (R, T), from `bottom_up`'s choices (wave order). OR passes
        its gradient to its chosen child (max) or shares it equally (mean); AND passes it to its children in
        proportion to their areas. Wave by wave, the largest first; both children of every AND slot of a wave take
        their share in one index_add."""
        rows = len(grad_root)
        grad_or = grad_root.new_zeros(self.grammar.num_or, rows)
        grad_or[self.wave_root] = grad_root
        grad_terminal = grad_root.new_empty(self.grammar.num_terminals, rows)
        split = self.wave_split.to(grad_root.dtype)
        for w0, w1, k in reversed(self.waves):
            g = grad_or[w0:w1]  # (n, R): complete, every parent sits in a later wave
            if k == 0:
                grad_terminal[w0:w1] = g
                continue
            n = w1 - w0
            if maximise:
                chosen = choices[w0:w1]  # (n, R)
                torch.mul(g, chosen == 0, out=grad_terminal[w0:w1])
                grad_and = g[:, None] * (chosen[:, None] == self.slot_ids[:k])  # (n, k, R): only the chosen AND
            else:
                grad_terminal[w0:w1] = g / self.wave_num_children[w0:w1, None]
                grad_and = grad_terminal[w0:w1, None]  # (n, 1, R): every AND child alike, the same share
            shares = grad_and[:, None] * split[w0:w1, :, :k, None]  # (n, 2, k, R): left and right child
            grad_or.index_add_(0, self.wave_children[w0:w1, :, :k].flatten(), shares.view(n * 2 * k, rows))
        return grad_terminal.index_select(0, self.wave_row).T

    def parse_leaves(self, choices: torch.Tensor) -> torch.Tensor:
        """(R, num_or) OR choices -> (R, T) bool: the terminals of each row's parse tree (a partition of the grid).

        Top-down from the root: an OR follows its chosen child; an AND activates both OR children. Loops over area
        levels (largest first), vectorised over rows."""
        rows = len(choices)
        active = torch.zeros(rows, self.grammar.num_or, dtype=torch.bool, device=choices.device)
        active[:, self.grammar.root] = True
        leaves = torch.zeros_like(active)
        choices = choices.long()
        for o0, o1 in reversed(self.levels):
            chosen = choices[:, o0:o1]  # (R, n)
            here = active[:, o0:o1]
            leaves[:, o0:o1] = here & (chosen == 0)
            row, col = (here & (chosen > 0)).nonzero(as_tuple=True)
            and_ids = self.or_and_children[o0 + col, chosen[row, col] - 1]
            active[row, self.and_left[and_ids]] = True
            active[row, self.and_right[and_ids]] = True
        return leaves

    def leaf_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Every terminal's rectangle inside each box: boxes (D, 4) xyxy -> (D, T, 4) xyxy."""
        rects = self.rects.to(boxes.dtype)
        size = torch.tensor([self.grammar.width, self.grammar.height], dtype=boxes.dtype, device=boxes.device)
        start = rects[:, [1, 0]] / size  # (T, 2) x, y fractions
        end = (rects[:, [1, 0]] + rects[:, [3, 2]]) / size
        origin, extent = boxes[:, None, :2], (boxes[:, 2:] - boxes[:, :2])[:, None]  # (D, 1, 2)
        return torch.cat([origin + start * extent, origin + end * extent], -1)

    def uniform_leaves(self) -> torch.Tensor:
        """(T,) bool: the fixed partition into single cells (what R-FCN's vote looks at)."""
        return self.area == 1

    def whole_box_leaves(self) -> torch.Tensor:
        """(T,) bool: the one-leaf partition (the box itself)."""
        return self.area == self.grammar.height * self.grammar.width


class _GrammarDP(torch.autograd.Function):
    """AOGParsing as one autograd node: bottom-up DP forward, top-down gradient backward, wave by wave. On CUDA, one
    Triton kernel per wave each way (`AOGParsing.runs_triton`); otherwise a few PyTorch ops per wave on preallocated
    buffers (autograd through per-wave in-place writes would copy the whole node table per wave)."""

    @staticmethod
    def forward(ctx: Any, terminal_scores: torch.Tensor, parser: AOGParsing, maximise: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.parser, ctx.maximise, ctx.triton = parser, maximise, parser.runs_triton(terminal_scores)
        ctx.dtype = terminal_scores.dtype
        if ctx.triton:  # choices (num_or, R) by OR id
            root, saved = kernels.bottom_up(terminal_scores.detach().T, parser.kernel_tables, parser.grammar.root,
                                            maximise)
            choices = saved.T
        else:  # choices (num_or, R) in wave order: the backward walks the waves, no permutation back
            root, saved = parser.bottom_up(terminal_scores.detach(), maximise)
            choices = parser.choices_by_or(saved)
        ctx.save_for_backward(saved)
        ctx.mark_non_differentiable(choices)
        return root, choices

    @staticmethod
    def backward(ctx: Any, grad_root: torch.Tensor, _grad_choices: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (saved,) = ctx.saved_tensors
        parser = ctx.parser
        if ctx.triton:
            grad = kernels.top_down(grad_root, saved, parser.kernel_tables, parser.grammar.root, ctx.maximise)
            return grad.T.to(ctx.dtype), None, None
        return parser.top_down_gradient(grad_root, saved, ctx.maximise), None, None


# ------------------------------------------------------------------------------------------- RoI heads (pluggable)
def infer_scale(feature: torch.Tensor, image_shapes: list[tuple[int, int]]) -> float:
    """Feature-to-image scale as a power of two, as torchvision's MultiScaleRoIAlign infers it: the feature map's
    height over the batch's tallest image (height to height; the map's width over the largest side put a batch of
    portrait images, width / height < 0.71, at half its scale, and pooled their boxes from the wrong cells)."""
    tallest = max(height for height, _ in image_shapes)
    return 2.0 ** round(math.log2(feature.shape[-2] / tallest)) if feature.shape[-2] < tallest else 1.0


def rois_with_batch_index(proposals: list[torch.Tensor]) -> torch.Tensor:
    """(K, 5) rows (image index, x1, y1, x2, y2) for torchvision.ops pooling."""
    index = torch.cat([torch.full((len(p), 1), i, dtype=p.dtype, device=p.device) for i, p in enumerate(proposals)])
    return torch.cat([index, torch.cat(proposals)], 1)


class Float32RoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (the `faster_rcnn_*` twin's pool) pooling in float32 and returning the
    features' dtype: under bf16-true its roi_align got bf16 features with float32 proposals and refused them (and
    has no bf16 CPU kernel); the precision of pooling as `PositionSensitivePool` keeps it."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        dtype = next(iter(x.values())).dtype
        pooled = super().forward({name: feature.float() for name, feature in x.items()},
                                 [box.float() for box in boxes], image_shapes)  # (K, C, 7, 7)
        return pooled.to(dtype)


class PositionSensitivePool(nn.Module):
    """The box_roi_pool replacement: 1x1 convs to position-sensitive maps, pooled per RoI.

    Returns {"terminal_scores": (K, C+1, T) (or (K, C+1, H*W) cell scores for `terminal_maps="cells"`),
    "box_regression": (K, 4)} (class-agnostic box deltas, voted over the H x W cells as in R-FCN).
    """

    def __init__(self, in_channels: int, num_classes: int, grammar: GridGrammar, terminal_maps: str = "terminals",
                 feature_key: str = "0", sampling_ratio: int = 2, terminal_rank: int | None = None) -> None:
        super().__init__()
        if terminal_maps not in TERMINAL_MAPS:
            raise ValueError(f"terminal_maps must be one of {TERMINAL_MAPS}; got {terminal_maps!r}.")
        if terminal_rank is not None and (terminal_maps != "terminals" or terminal_rank < 1):
            raise ValueError(f"terminal_rank factorises per-terminal maps: a positive int with "
                             f"terminal_maps='terminals'; got {terminal_rank!r} with {terminal_maps!r}.")
        self.grammar, self.terminal_maps, self.num_classes = grammar, terminal_maps, num_classes
        self.feature_key, self.sampling_ratio = feature_key, sampling_ratio
        groups = grammar.num_terminals if terminal_maps == "terminals" else grammar.height * grammar.width
        # terminal_rank r: every terminal's maps are read from r shared basis maps (weights of rank <= r)
        self.terminal_basis = nn.Conv2d(in_channels, terminal_rank, 1) if terminal_rank else None
        self.score_maps = nn.Conv2d(terminal_rank or in_channels, num_classes * groups, 1)
        self.box_maps = nn.Conv2d(in_channels, 4 * grammar.height * grammar.width, 1)
        top, left, height, width = torch.tensor(grammar.rects, dtype=torch.float32).T[..., None]  # (T, 1), in cells
        # each terminal's sub-box edges in grid cells from the box's origin: (low/high, x/y, T, 1)
        fractions = torch.stack([torch.stack([left, top]), torch.stack([left + width, top + height])])
        self.register_buffer("edge_fractions", fractions, persistent=False)
        self.register_buffer("grid_cells", torch.tensor([grammar.width, grammar.height], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("terminal_ids", torch.arange(grammar.num_terminals)[:, None], persistent=False)
        # box sum = S(y2, x2) - S(y1, x2) - S(y2, x1) + S(y1, x1), the corners in this order
        self.register_buffer("corner_signs", torch.tensor([[1.0], [-1.0], [-1.0], [1.0]]), persistent=False)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        feature = features[self.feature_key]
        scale = infer_scale(feature, image_shapes)
        rois = rois_with_batch_index(proposals).float()  # (K, 5)
        grid = (self.grammar.height, self.grammar.width)
        # pooling in float32: ps_roi_align has no bf16 CPU kernel, and integral images need the precision
        box = ps_roi_align(self.box_maps(feature).float(), rois, grid, scale, self.sampling_ratio).mean((2, 3))
        if self.terminal_maps == "cells":
            cells = ps_roi_align(self.score_maps(feature).float(), rois, grid, scale, self.sampling_ratio)
            return {"terminal_scores": cells.flatten(2), "box_regression": box}  # (K, C+1, H*W)
        return {"terminal_scores": self._pool_terminals(feature, rois, scale), "box_regression": box}

    def _pool_terminals(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        """Terminal t's own (C+1) score maps averaged over its sub-box of each RoI: (K, C+1, T).

        Box means come from an integral image (four corner lookups per RoI and terminal, whatever the box size); the
        sub-box is widened to the feature cells it touches, at least one. With full-rank maps the integral image is
        the score maps' (the 1x1 conv, without bias, then running sums); with `terminal_rank` r the r basis maps' box
        means are looked up first and each terminal's (C+1) x r weights applied to its own means (one batched
        matmul), so no T x (C+1)-channel map is made. Biases add back to the means.

        In float32 with autocast off: box sums are differences of large running sums. On Ampere and later GPUs
        cuDNN convolutions (and matmuls under `torch.set_float32_matmul_precision("high")`) round float32 operands
        to TF32's 10-bit mantissa, which would lose the box sums of small boxes in the rounding of the large running
        sums (emulated on the CPU: a score error of 78 % of the score std at full rank, and of 11 % of the gradient's
        largest entry: the weight gradient reads the sums against TF32-rounded gradients). So the running sums are
        cumsums, never a matmul, and read by lookups and adds only. At full rank, on the devices that have TF32
        (`TF32_DEVICE_TYPES`), the 1x1 conv makes the T x (C+1) score maps first and their running sums follow; on
        the CPU, the conv on the features' running sums is 2.7x cheaper in the 7x7 step (the sums of T x (C+1)
        channels and their backward are what cost there), and exact."""
        low_rank = self.terminal_basis is not None
        if low_rank:
            feature = self.terminal_basis(feature)  # (n, r, fh, fw)
        fh, fw = feature.shape[-2:]
        terminals, classes = self.grammar.num_terminals, self.num_classes
        weight = self.score_maps.weight.float()  # (T*(C+1), r or in_channels, 1, 1)
        with torch.autocast(feature.device.type, enabled=False):
            if low_rank:
                table = _integral_table(feature.float())  # (n*(fh+1)*(fw+1), r): row (b*(fh+1) + y)*(fw+1) + x
            elif feature.device.type in TF32_DEVICE_TYPES:  # the maps first: no conv reads a running sum (docstring)
                table = _integral_table(F.conv2d(feature.float(), weight)).view(-1, classes)
            else:  # the features' running sums first: the conv's cheapest form on the CPU
                integral = _integral_table(feature.float()).view(len(feature), fh + 1, fw + 1, -1)  # (n, fh+1, fw+1, c)
                sums = F.conv2d(integral.permute(0, 3, 1, 2), weight)  # (n, T*(C+1), fh+1, fw+1), channels last
                table = sums.permute(0, 2, 3, 1).reshape(-1, classes)  # row ((b*(fh+1) + y)*(fw+1) + x)*T + t
        position, area = self._terminal_boxes(rois, scale, fh, fw)  # (4, T, K), (T, K, 1)
        bias = self.score_maps.bias.float().view(terminals, 1, classes)
        if low_rank:  # a small table: four lookups (four small gradient buffers) beat one of four times the rows
            corners = [table.index_select(0, rows.flatten()) for rows in position]  # 4 x (T*K, r)
            total = ((corners[0] - corners[1]) - (corners[2] - corners[3])).view(terminals, len(rois), -1)
            # terminal t's own weights on its own basis means: (T, K, r) @ (T, r, C+1), in float32
            with torch.autocast(feature.device.type, enabled=False):
                own = weight.view(terminals, classes, -1).transpose(1, 2)
                scores = torch.baddbmm(bias, total / area, own)  # (T, K, C+1)
        else:  # a table of T x (C+1) per position: one lookup and a signed sum (elementwise, never a matmul: see
            # above; no slicing), so the backward makes one table-sized gradient buffer, not four zero-filled ones
            rows = position * terminals + self.terminal_ids
            corners = table.index_select(0, rows.flatten()).view(4, -1)  # (4, T*K*(C+1))
            total = (corners * self.corner_signs).sum(0).view(terminals, len(rois), classes)  # (T, K, C+1)
            scores = torch.addcdiv(bias, total, area)  # bias + total / area
        # (K, C+1, T) as a view of the terminal-major scores: flattened to rows it is the DP's (T, rows) layout as is
        return scores.permute(1, 2, 0)

    def _terminal_boxes(self, rois: torch.Tensor, scale: float, fh: int, fw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every terminal's sub-box of every RoI (K, 5), widened to the feature cells it touches (at least one):
        the rows of its four corners in the integral image of (n, fh, fw) features, (4, T, K) long in the order of
        `corner_signs`, and its area in cells, (T, K, 1). All edges of all terminals and RoIs at once (terminal-
        major, the order the DP reads), so the grid's size does not change how many kernels this takes."""
        xy = rois[:, 1:] * scale  # (K, 4): x1, y1, x2, y2 in feature cells
        origin = xy[:, :2].T[:, None]  # (x/y, 1, K)
        cell = ((xy[:, 2:] - xy[:, :2]) / self.grid_cells).T[:, None]  # (x/y, 1, K): a grid cell's width, height
        edges = origin + self.edge_fractions * cell  # (low/high, x/y, T, K)
        low, high = edges[0].floor(), edges[1].ceil()
        low[0].clamp_(0, fw - 1)
        low[1].clamp_(0, fh - 1)
        high[0].clamp_(max=fw)
        high[1].clamp_(max=fh)
        high = torch.maximum(high, low + 1)
        area = (high - low).prod(0)[..., None]  # (T, K, 1)
        bounds = torch.stack([high, low]).long()  # (high/low, x/y, T, K)
        ys, xs = bounds[:, 1], bounds[:, 0]  # (2, T, K): y2, y1 and x2, x1
        position = (rois[:, 0].long() * (fh + 1) + ys[None]) * (fw + 1) + xs[:, None]  # (x2/x1, y2/y1, T, K)
        return position.flatten(0, 1), area  # corners (y2, x2), (y1, x2), (y2, x1), (y1, x1)


def _integral_table(maps: torch.Tensor) -> torch.Tensor:
    """The integral image of maps (n, c, fh, fw) as a lookup table (n*(fh+1)*(fw+1), c): row (b*(fh+1) + y)*(fw+1)
    + x sums the cells of image b above and left of (y, x). Running sums (cumsums) in the maps' dtype, on a zero
    row and column: no matmul, so no TF32 rounding of the sums."""
    padded = F.pad(maps.permute(0, 2, 3, 1), (0, 0, 1, 0, 1, 0))  # (n, fh+1, fw+1, c), contiguous
    return padded.cumsum(1).cumsum(2).view(-1, maps.shape[1])



#: Device types whose float32 convolutions may run in TF32 (cuDNN's default on Ampere and later NVIDIA GPUs; Intel
#: GPUs under `torch.backends.mkldnn` settings): there the full-rank terminal pooling never lets a conv read running
#: sums (`PositionSensitivePool._pool_terminals`).
TF32_DEVICE_TYPES = frozenset({"cuda", "xpu"})


class AOGParsingHead(nn.Module):
    """box_head: root OR score per class from AOGParsing over the pooled terminal scores."""

    def __init__(self, grammar: GridGrammar, or_mode: str = "mean", terminal_maps: str = "terminals",
                 dp_kernel: str = "waves") -> None:
        super().__init__()
        self.parser = AOGParsing(grammar, or_mode, dp_kernel)
        self.terminal_maps = terminal_maps

    def get_extra_state(self) -> torch.Tensor:
        """The OR mode, saved with the weights as "<prefix>_extra_state": folding or unfolding is part of the trained
        model (an unfolded model scored with folding is another model), but a stage sets it only when a training
        epoch starts, so every load (System checkpoint, export, `--ckpt_path`) must restore it. A () int64 tensor,
        the index in OR_MODES, so that safetensors exports and weights_only loads keep it."""
        return torch.tensor(OR_MODES.index(self.parser.or_mode))

    def set_extra_state(self, state: Any) -> None:
        index = int(state)  # at load time only: the host read is no training step's
        if not 0 <= index < len(OR_MODES):
            raise ValueError(f"The saved OR mode {index} is not an index of {OR_MODES}.")
        self.parser.or_mode = OR_MODES[index]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Weights saved before the OR mode was (no "_extra_state" key) keep this model's mode and still load
        strictly, as BatchNorm fills in a missing `num_batches_tracked`. `state_dict` is load_state_dict's copy."""
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # torch's key for the extra state
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class logits and box deltas; in eval mode also "or_choices" (K, C+1, num_or), the parse trees that
        post-processing keeps. Training needs no trees: it takes the root scores alone (`AOGParsing.root_scores`)."""
        scores = pooled["terminal_scores"]
        k, classes = scores.shape[:2]
        flat = scores.flatten(0, 1)  # (K*(C+1), T or H*W)
        if self.terminal_maps == "cells":
            flat = self.parser.terminal_from_cells(flat)
        if self.training:
            root = self.parser.root_scores(flat)
            return {"class_logits": root.reshape(k, classes), "box_regression": pooled["box_regression"]}
        root, choices = self.parser(flat)
        return {"class_logits": root.reshape(k, classes), "box_regression": pooled["box_regression"],
                "or_choices": choices.reshape(k, classes, -1)}


class AverageVoteHead(nn.Module):
    """box_head of R-FCN: the class score is the mean of the H x W position-sensitive cell scores."""

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"class_logits": pooled["terminal_scores"].mean(-1), "box_regression": pooled["box_regression"]}


class VotePredictor(nn.Module):
    """box_predictor of the position-sensitive heads: no parameters; class-agnostic deltas repeated per class."""

    def forward(self, head_out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head_out["class_logits"]
        return logits, head_out["box_regression"].repeat(1, logits.shape[1])  # (K, 4 (C+1))


class ParsingRoIHeads(RoIHeads):
    """torchvision's RoIHeads (boxes only) that keeps each detection's proposal, so its parse tree survives
    post-processing. Besides torchvision's "boxes" (D, 4), "scores" (D,) and "labels" (D,), every result gets
    "leaf_boxes" (D, T, 4): the T terminal rectangles of `grid`'s grammar inside each box (the baselines too, so
    fixed partitions of the same grid can be scored on their detections), and "parse_leaves" (D, T) bool, the
    terminals of each detection's best parse tree, when the head parses.

    Args:
        grid: the grammar's operator (the parsing head's own for AOG) that places terminals in boxes and reads
            parse trees from OR choices; the rest are RoIHeads' arguments."""

    def __init__(self, grid: AOGParsing, *args: Any) -> None:
        super().__init__(*args)
        self.grid = grid

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        head_out = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(head_out)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        choices = head_out.get("or_choices") if isinstance(head_out, dict) else None
        return self._detections(class_logits, box_regression, proposals, image_shapes, choices), {}

    def _detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: list[torch.Tensor],
                    image_shapes: list[tuple[int, int]], choices: torch.Tensor | None) -> list[dict[str, torch.Tensor]]:
        """torchvision's postprocess_detections with the (proposal, class) of each kept detection tracked."""
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        decoded = self.box_coder.decode(box_regression, proposals)  # float32 (float64 under 64-true): FloatBoxCoder
        # the scores in the boxes' dtype, at least float32 (also under autocast): nms takes boxes and scores of one
        # dtype, and under `--trainer.precision=64-true` the boxes are float64
        score_dtype = torch.promote_types(decoded.dtype, torch.float32)
        pred_boxes = decoded.to(score_dtype).split(counts)
        pred_scores = F.softmax(class_logits.to(score_dtype), -1).split(counts)
        offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
        results = []
        for i, (boxes, scores, shape) in enumerate(zip(pred_boxes, pred_scores, image_shapes)):  # per image
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=boxes.device).repeat(len(scores))
            proposal = torch.arange(len(scores), device=boxes.device).repeat_interleave(num_classes - 1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            result = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                      "leaf_boxes": self.grid.leaf_boxes(boxes[keep])}  # (D, T, 4)
            if choices is not None:
                chosen = choices[offsets[i] + proposal[keep], labels[keep]]  # (D, num_or)
                result["parse_leaves"] = self.grid.parse_leaves(chosen)  # (D, T) bool
            results.append(result)
        return results


# ----------------------------------------------------------------------------------------------------- detector
class FloatBoxCoder(BoxCoder):
    """torchvision's BoxCoder that encodes and decodes in float32 (float64 stays), autocast off. torchvision casts
    the boxes to the deltas' dtype, so under bf16 autocast the RPN's conv deltas and the RoI heads' deltas would
    decode every proposal and detection in bf16: 8 mantissa bits, 2 px apart at 256-511 px (VOC's 480 px images),
    errors of up to a few pixels and bf16 detections. Deltas are small numbers that bf16 keeps well; the boxes they
    move are not."""

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        dtype = _box_dtype(reference_boxes, proposals)
        with torch.autocast(reference_boxes.device.type, enabled=False):
            return super().encode_single(reference_boxes.to(dtype), proposals.to(dtype))

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        dtype = _box_dtype(rel_codes, boxes)
        with torch.autocast(rel_codes.device.type, enabled=False):
            return super().decode_single(rel_codes.to(dtype), boxes.to(dtype))


class ScoresLikeBoxesRPN(RegionProposalNetwork):
    """torchvision's RPN whose proposal filter, outside autocast, takes the objectness in the proposals' dtype.
    `FloatBoxCoder` decodes the proposals in float32 while, under `--trainer.precision=bf16-true`, the RPN head's
    objectness is bf16, and torchvision's nms refuses boxes and scores of two dtypes. Under autocast nothing changes:
    torchvision's nms casts both to float32 itself, and the bf16 objectness it ranks stays as it was."""

    @classmethod
    def like(cls, rpn: RegionProposalNetwork) -> ScoresLikeBoxesRPN:
        """`rpn`'s anchors, head (the same modules: the state dict's keys do not change) and settings."""
        return cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                   rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                   rpn.fg_bg_sampler.positive_fraction, rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh,
                   rpn.score_thresh)

    def filter_proposals(self, proposals: torch.Tensor, objectness: torch.Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if not torch.is_autocast_enabled(objectness.device.type):
            objectness = objectness.to(proposals.dtype)  # (B, A) bf16 -> float32 under bf16-true; else a no-op
        return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)


def _box_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when a tensor is float64: the dtype boxes are coded in."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)


def _float_box_coder(coder: BoxCoder) -> FloatBoxCoder:
    """`coder`'s weights and clip in a FloatBoxCoder."""
    return FloatBoxCoder(coder.weights, coder.bbox_xform_clip)


class LeafBoxTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform whose postprocess also maps each detection's "leaf_boxes" (D, T, 4) from
    the resized image back to the original one, with the `resize_boxes` that maps its "boxes": the leaves stay
    inside their box at every input size (torchvision rescales only the keys it knows)."""

    def postprocess(self, result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        if not self.training:
            for pred, resized, original in zip(result, image_shapes, original_image_sizes):
                if "leaf_boxes" in pred:
                    leaves = pred["leaf_boxes"]  # (D, T, 4) in the resized frame
                    pred["leaf_boxes"] = resize_boxes(leaves.reshape(-1, 4), resized, original).reshape(leaves.shape)
        return super().postprocess(result, image_shapes, original_image_sizes)


def detector_normalization(backbone: str, in_chans: int, pretrained: bool) -> tuple[list[float], list[float]]:
    """The per-channel mean and std a detector normalises its images with: the backbone's pretrained ones
    (`datamodules._base.pretrained_normalization`, ImageNet's for timm's and torchvision's ImageNet weights;
    averaged over the channels for grey images) when it starts from a weight file of a backbone that has them,
    else 0.5 / 0.25 (a backbone trained from scratch, or the tiny CNN, which has no pretrained config)."""
    if not pretrained or backbone == TINY_CNN:
        return [0.5] * in_chans, [0.25] * in_chans
    mean, std = pretrained_normalization(backbone, in_chans)  # grey images: timm's channel average
    return mean * (in_chans // len(mean)), std * (in_chans // len(std))


class DetectionBackbone(nn.Module):
    """A zoo Backbone's top map as torchvision's detection backbone (OrderedDict {"0": map}, `out_channels`)."""

    def __init__(self, name: str, in_chans: int, out_index: int, pretrained_path: str | None) -> None:
        super().__init__()
        self.body = Backbone(name, in_chans=in_chans, out_indices=(out_index,), pretrained_path=pretrained_path)
        self.out_channels = self.body.num_features
        self.reduction = self.body.reductions[-1]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(x)[-1])])


class AOGRCNN(FasterRCNN):
    """torchvision FasterRCNN whose RoI head is `head` ("aog", "vote" or "mlp"); forward as FasterRCNN's
    (train: dict of losses; eval: per image {"boxes", "labels", "scores", "leaf_boxes"} and, for "aog",
    "parse_leaves": see `ParsingRoIHeads`; boxes and leaves in the input image's pixels, whatever its size).
    `or_mode` switches folding ("mean") and unfolding ("max"); it is saved with the weights (`AOGParsingHead`).
    Only an unfolding model's "parse_leaves" are the parse tree that scored the detection: the first eval forward
    while folding warns (`folded_parse_warning`; once per model, and not while `warn_folded` is False, which
    `AOGRCNNSystem` sets during its fit, whose folding stage is the schedule's).

    `num_classes` counts object classes; the background class is added here (labels 1..num_classes).

    The detector normalises its [0, 1] input images itself (torchvision's transform): with the mean and std the
    backbone was pretrained with when `pretrained_path` gives it weights (`detector_normalization`), else with
    0.5 / 0.25 (a backbone trained from scratch)."""

    def __init__(self, *, num_classes: int, head: str = "aog", backbone: str = TINY_CNN, in_chans: int = 3,
                 backbone_index: int = -1, pretrained_path: str | None = None, image_size: int = 128,
                 grid: tuple[int, int] = (3, 3), or_mode: str = "mean", terminal_maps: str = "terminals",
                 terminal_rank: int | None = None, dp_kernel: str = "waves",
                 anchor_sizes: tuple[int, ...] = (16, 32, 64),
                 aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 rpn_pre_nms_top_n: int = 300, rpn_post_nms_top_n: int = 150, box_batch_size_per_image: int = 128,
                 box_detections_per_img: int = 50, representation_size: int = 256) -> None:
        if head not in ("aog", "vote", "mlp"):
            raise ValueError(f"head must be 'aog', 'vote' or 'mlp'; got {head!r}.")
        body = DetectionBackbone(backbone, in_chans, backbone_index, pretrained_path)
        classes = num_classes + 1
        grammar = GridGrammar(*grid)
        if head == "mlp":
            pool = Float32RoIAlign(["0"], output_size=7, sampling_ratio=2)
            box_head = TwoMLPHead(body.out_channels * 49, representation_size)
            predictor = FastRCNNPredictor(representation_size, classes)
        else:
            maps = terminal_maps if head == "aog" else "cells"
            pool = PositionSensitivePool(body.out_channels, classes, grammar, maps,
                                         terminal_rank=terminal_rank if head == "aog" else None)
            box_head = AOGParsingHead(grammar, or_mode, maps, dp_kernel) if head == "aog" else AverageVoteHead()
            predictor = VotePredictor()
        anchors = AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),))
        image_mean, image_std = detector_normalization(backbone, in_chans, pretrained_path is not None)
        super().__init__(body, num_classes=None, min_size=image_size, max_size=image_size,
                         image_mean=image_mean, image_std=image_std, rpn_anchor_generator=anchors,
                         rpn_pre_nms_top_n_train=2 * rpn_pre_nms_top_n, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n,
                         rpn_post_nms_top_n_train=2 * rpn_post_nms_top_n, rpn_post_nms_top_n_test=rpn_post_nms_top_n,
                         # placeholders: torchvision type-checks box_roi_pool; the real heads are set below
                         box_roi_pool=MultiScaleRoIAlign(["0"], 1, 1), box_head=nn.Identity(),
                         box_predictor=nn.Identity())
        grid = box_head.parser if head == "aog" else AOGParsing(grammar)  # the baselines: the same grid's geometry
        self.roi_heads = ParsingRoIHeads(grid, pool, box_head, predictor, 0.5, 0.5, box_batch_size_per_image, 0.25,
                                         None, 0.05, 0.5, box_detections_per_img)
        # proposals and detections are decoded in float32 also under autocast (`FloatBoxCoder`), and the proposals
        # are filtered with scores of their dtype also under bf16-true (`ScoresLikeBoxesRPN`)
        self.rpn = ScoresLikeBoxesRPN.like(self.rpn)
        self.rpn.box_coder = _float_box_coder(self.rpn.box_coder)
        self.roi_heads.box_coder = _float_box_coder(self.roi_heads.box_coder)
        base = self.transform  # FasterRCNN's, rebuilt with the same settings to rescale the leaves too
        self.transform = LeafBoxTransform(base.min_size, base.max_size, base.image_mean, base.image_std,
                                          base.size_divisible, base.fixed_size, _skip_resize=base._skip_resize)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.warn_folded = True  # the next eval forward while folding warns (then not again: once per model)

    @property
    def parser(self) -> AOGParsing | None:
        """The AOGParsing operator (None for the baselines)."""
        head = self.roi_heads.box_head
        return head.parser if isinstance(head, AOGParsingHead) else None

    @property
    def or_mode(self) -> str | None:
        """Folding ("mean") or unfolding ("max"); None for the baselines, which ignore a setting (so a stage
        schedule written for AOG runs their twins unchanged)."""
        return self.parser.or_mode if self.parser is not None else None

    @or_mode.setter
    def or_mode(self, mode: str) -> None:
        if self.parser is not None:
            self.parser.or_mode = mode
        elif mode not in OR_MODES:
            raise ValueError(f"or_mode must be one of {OR_MODES} (folding, unfolding); got {mode!r}.")

    def fixed_partitions(self) -> dict[str, torch.Tensor]:
        """The two fixed partitions of every box into the grammar's terminals, (T,) bool each, to compare a parse
        tree's leaves with: "grid" (the H x W single cells R-FCN's vote looks at) and "box" (the box itself)."""
        grid = self.roi_heads.grid
        return {"grid": grid.uniform_leaves(), "box": grid.whole_box_leaves()}

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"{type(self).__name__} expects a list of ({self.in_chans}, H, W) float images "
                            f"(torchvision detection input); got {type(images).__name__}.")
        if not images:
            raise ValueError(f"{type(self).__name__} got an empty list of images; pass at least one.")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{type(self).__name__} got {len(images)} images and {len(targets)} targets; give one "
                             f"target per image.")
        for i, image in enumerate(images):
            check_input(f"{type(self).__name__} (image {i} of the list)", image, (self.in_chans, "H", "W"), "images")
        if targets is not None:
            for i, target in enumerate(targets):
                labels = target.get("labels")
                span = None if labels is None else ids_out_of_range(labels, 1, self.num_classes)
                if span is not None:
                    raise ValueError(f"Target {i}: labels span [{span[0]}, {span[1]}], outside "
                                     f"[1, {self.num_classes}] (0 is the background).")
        # getattr: a model pickled before `warn_folded` existed has no such attribute
        if not self.training and getattr(self, "warn_folded", True) and self.or_mode == "mean":
            self.warn_folded = False
            # stacklevel: the caller of the module (forward <- _call_impl <- _wrapped_call_impl <- caller)
            warnings.warn(folded_parse_warning(f"This {type(self).__name__}"), UserWarning, stacklevel=4)
        return super().forward(images, targets)


def _create_detector(head: str, backbone: str, **kwargs: Any) -> AOGRCNN:
    if backbone != TINY_CNN:
        kwargs.setdefault("backbone_index", 3)  # stride-16 stage, as R-FCN on conv4
        kwargs.setdefault("anchor_sizes", (32, 64, 128))
    return AOGRCNN(head=head, backbone=backbone, **kwargs)


@register_model
@input_size_aware
def aog_rcnn_tinycnn(num_classes: int = 4, **kwargs: Any) -> AOGRCNN:
    """AOG-parsed R-CNN (Wu et al. 2017): 3x3 grid grammar replacing RoI pooling, tiny CNN backbone."""
    return _create_detector("aog", TINY_CNN, num_classes=num_classes, **kwargs)


@register_model
@input_size_aware
def aog_rcnn_resnet18(num_classes: int = 20, **kwargs: Any) -> AOGRCNN:
    """AOG-parsed R-CNN on timm resnet18 (stride-16 features)."""
    return _create_detector("aog", "resnet18", num_classes=num_classes, **kwargs)


@register_model
@input_size_aware
def vote_rcnn_tinycnn(num_classes: int = 4, **kwargs: Any) -> AOGRCNN:
    """Opaque twin: R-FCN average vote over 3x3 position-sensitive cells, tiny CNN backbone."""
    return _create_detector("vote", TINY_CNN, num_classes=num_classes, **kwargs)


@register_model
@input_size_aware
def vote_rcnn_resnet18(num_classes: int = 20, **kwargs: Any) -> AOGRCNN:
    """Opaque twin: R-FCN average vote on timm resnet18."""
    return _create_detector("vote", "resnet18", num_classes=num_classes, **kwargs)


@register_model
@input_size_aware
def faster_rcnn_tinycnn(num_classes: int = 4, **kwargs: Any) -> AOGRCNN:
    """Opaque baseline: torchvision Faster R-CNN head (RoIAlign 7x7 + TwoMLPHead), tiny CNN backbone."""
    return _create_detector("mlp", TINY_CNN, num_classes=num_classes, **kwargs)


@register_model
@input_size_aware
def faster_rcnn_resnet18(num_classes: int = 20, **kwargs: Any) -> AOGRCNN:
    """Opaque baseline: torchvision Faster R-CNN head on timm resnet18."""
    return _create_detector("mlp", "resnet18", num_classes=num_classes, **kwargs)
