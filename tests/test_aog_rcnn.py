"""AOG-parsed R-CNN: the grammar, the AOGParsing DP against brute force, the heads, the detector, its data."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torchvision.models.detection.roi_heads import RoIHeads

import zoo
from datamodules import DatasetLayoutError, PartsWorldScenesDataModule, VOCDataModule
from zoo.aog_rcnn import model as aog_model
from zoo.aog_rcnn.metrics import ParsePartIoU
from zoo.aog_rcnn.model import (AOGParsing, AOGParsingHead, AverageVoteHead, GridGrammar, PositionSensitivePool,
                                rois_with_batch_index)

from tests.test_registry import DETECTOR_MODELS


def closed_form_counts(height: int, width: int) -> tuple[int, int, int]:
    """(#terminal, #AND, #OR) of the H x W grid grammar from the spec's closed form."""
    terminals = math.comb(height + 1, 2) * math.comb(width + 1, 2)
    ands = math.comb(width + 1, 2) * math.comb(height + 1, 3) + math.comb(height + 1, 2) * math.comb(width + 1, 3)
    return terminals, ands, terminals


# ------------------------------------------------------------------------------------------------ the grammar
@pytest.mark.parametrize("grid, expected", [((2, 2), (9, 6, 9)), ((3, 3), (36, 48, 36)), ((4, 4), (100, 200, 100)),
                                            ((2, 3), None), ((3, 5), None), ((1, 4), None)])
def test_node_counts_match_the_closed_form(grid: tuple[int, int], expected: tuple[int, int, int] | None) -> None:
    grammar = GridGrammar(*grid)
    counts = (grammar.num_terminals, grammar.num_and, grammar.num_or)
    assert counts == closed_form_counts(*grid)
    if expected is not None:  # the spec's table
        assert counts == expected


def count_trees(height: int, width: int) -> int:
    """Parse trees of an h x w rectangle, counted by recursion over cuts (independent of GridGrammar)."""
    @functools.lru_cache(maxsize=None)
    def trees(h: int, w: int) -> int:
        return 1 + sum(trees(k, w) * trees(h - k, w) for k in range(1, h)) + \
            sum(trees(h, k) * trees(h, w - k) for k in range(1, w))
    return trees(height, width)


def test_parse_tree_counts() -> None:
    assert GridGrammar(3, 3).num_parse_trees == 1241
    assert GridGrammar(2, 2).num_parse_trees == 9
    assert GridGrammar(4, 4).num_parse_trees == 2_590_351
    assert GridGrammar(2, 5).num_parse_trees == count_trees(2, 5)


def all_trees(top: int, left: int, h: int, w: int) -> list[list[tuple[int, int, int, int]]]:
    """Every parse tree of a rectangle as its list of leaf rectangles (brute-force enumeration)."""
    trees = [[(top, left, h, w)]]
    for k in range(1, h):
        trees += [a + b for a in all_trees(top, left, k, w) for b in all_trees(top + k, left, h - k, w)]
    for k in range(1, w):
        trees += [a + b for a in all_trees(top, left, h, k) for b in all_trees(top, left + k, h, w - k)]
    return trees


@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (2, 4), (1, 3), (4, 4), (7, 7)])
@pytest.mark.parametrize("or_mode", ["max", "mean"])
def test_root_scores_alone_equal_the_dp_and_its_gradient(grid: tuple[int, int], or_mode: str) -> None:
    """Training's root scores without choices (a matrix-vector product when folding; on a GPU, every partition's
    score and their max when unfolding a grid of at most ENUMERATED_TREES trees; the DP otherwise) are the DP's, and
    so is their gradient (random scores: no ties). The partitions' max runs here on the CPU, called directly."""
    from zoo.aog_rcnn.model import ENUMERATED_TREES

    torch.manual_seed(0)
    parser = AOGParsing(GridGrammar(*grid), or_mode)
    assert (parser.partition_weights is not None) == (parser.grammar.num_parse_trees <= ENUMERATED_TREES)
    alone = [parser.root_scores]
    if or_mode == "max" and parser.partition_weights is not None:
        alone.append(parser.best_partition_scores)  # what root_scores runs on a GPU
    terminals = torch.randn(40, parser.grammar.num_terminals, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(40, dtype=torch.float64)
    dp_root = parser(terminals)[0]
    dp_grad, = torch.autograd.grad(dp_root, terminals, upstream)
    for scores_of in alone:
        root = scores_of(terminals)
        grad, = torch.autograd.grad(root, terminals, upstream)
        torch.testing.assert_close(root, dp_root, rtol=1e-6, atol=1e-6)  # float32 weights (1/9 is not exact)
        torch.testing.assert_close(grad, dp_grad, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # scored in float32, returned in the scores' dtype
            half = scores_of(terminals.detach().bfloat16())
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.double(), parser(terminals.detach().bfloat16().double())[0], rtol=0,
                                   atol=0.05)


def test_grid_partitions_are_the_distinct_leaf_sets_of_all_trees() -> None:
    grammar = GridGrammar(3, 3)
    index = {r: i for i, r in enumerate(grammar.rects)}
    expected = {frozenset(index[r] for r in tree) for tree in all_trees(0, 0, 3, 3)}
    partitions = grammar.partitions()
    assert len(partitions) == len(expected) == 320 and {frozenset(row.nonzero()[:, 0].tolist())
                                                        for row in partitions} == expected
    with pytest.raises(ValueError, match="two cells"):
        AOGParsing(GridGrammar(1, 1))


@pytest.mark.parametrize("grid", [(2, 2), (2, 3), (3, 3), (2, 4)])  # 2x4: 1x4 and 2x2 share a level, padded
def test_max_parse_equals_the_best_of_all_enumerated_trees(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    parser = AOGParsing(GridGrammar(*grid), "max")
    terminals = torch.randn(64, parser.grammar.num_terminals, dtype=torch.float64)
    trees = all_trees(0, 0, *grid)
    assert len(trees) == parser.grammar.num_parse_trees
    index = {r: i for i, r in enumerate(parser.grammar.rects)}
    total = grid[0] * grid[1]
    # a tree's score: its leaves' terminal scores weighted by leaf area (nested area-weighted ANDs)
    scores = torch.stack([sum(terminals[:, index[r]] * (r[2] * r[3] / total) for r in tree) for tree in trees], 1)
    root, choices = parser(terminals)
    torch.testing.assert_close(root, scores.max(1).values)
    leaves = parser.parse_leaves(choices)
    best = [set(trees[int(i)]) for i in scores.argmax(1)]
    assert [{parser.grammar.rects[t] for t in row.nonzero().flatten().tolist()} for row in leaves] == best


@pytest.mark.parametrize("grid", [(2, 3), (2, 4)])
def test_mean_parse_matches_a_recursive_reference(grid: tuple[int, int]) -> None:
    torch.manual_seed(1)
    parser = AOGParsing(GridGrammar(*grid), "mean")
    terminals = torch.randn(3, parser.grammar.num_terminals, dtype=torch.float64)
    index = {r: i for i, r in enumerate(parser.grammar.rects)}

    def or_score(t: int, l: int, h: int, w: int) -> torch.Tensor:
        children = [terminals[:, index[(t, l, h, w)]]]
        for k in range(1, h):
            children.append((k * or_score(t, l, k, w) + (h - k) * or_score(t + k, l, h - k, w)) / h)
        for k in range(1, w):
            children.append((k * or_score(t, l, h, k) + (w - k) * or_score(t, l + k, h, w - k)) / w)
        return torch.stack(children).mean(0)

    torch.testing.assert_close(parser(terminals)[0], or_score(0, 0, *grid))


@pytest.mark.parametrize("or_mode", ["max", "mean"])
@pytest.mark.parametrize("grid", [(3, 2), (2, 4)])
def test_the_dp_gradient_passes_gradcheck(or_mode: str, grid: tuple[int, int]) -> None:
    parser = AOGParsing(GridGrammar(*grid), or_mode).double()
    children = parser.or_num_children
    padded = any(children[o0:o1].min() < children[o0:o1].max() for o0, o1 in parser.levels)
    assert padded == (grid == (2, 4))  # 1x4 and 2x2 share an area level
    x = torch.randn(4, parser.grammar.num_terminals, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: parser(t)[0], (x,))


@pytest.mark.parametrize("grid", [(7, 7), (3, 5), (2, 4), (1, 3)])
def test_the_dp_runs_in_height_plus_width_waves_each_after_its_children(grid: tuple[int, int]) -> None:
    """The DP's schedule: H + W - 1 waves (7x7: 13, against 25 area levels), each a contiguous block of the node
    table in wave order whose ORs all have h + w - 2 AND children, every child in an earlier wave."""
    parser = AOGParsing(GridGrammar(*grid))
    height, width = grid
    assert len(parser.waves) == height + width - 1 <= len(parser.levels)
    assert [w0 for w0, *_ in parser.waves] == [0] + [w1 for _, w1, _ in parser.waves[:-1]]
    assert parser.waves[-1][1] == parser.grammar.num_or and parser.wave_root == parser.grammar.num_or - 1
    for w0, w1, k in parser.waves:
        rects = parser.rects[parser.wave_order[w0:w1]]
        assert (rects[:, 2] + rects[:, 3] == k + 2).all() and (parser.wave_num_children[w0:w1] == k + 1).all()
        assert (parser.wave_children[w0:w1, 0, :k] < w0).all() and (parser.wave_children[w0:w1, 1, :k] < w0).all()
    assert torch.equal(parser.wave_order[parser.wave_row], torch.arange(parser.grammar.num_or))


def tree_score(parser: AOGParsing, terminals: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """(R,) score of each row's parse tree given by `choices` (R, num_or): its leaves' terminal scores, weighted by
    their share of the grid's area (what the max DP's root is for the tree it chose)."""
    leaves = parser.parse_leaves(choices).to(terminals.dtype)  # (R, T)
    share = parser.area.to(terminals.dtype) / (parser.grammar.height * parser.grammar.width)
    return (terminals * leaves * share).sum(1)


def check_kernels_against_the_waves(parser: AOGParsing, terminals: torch.Tensor) -> None:
    """The Triton DP (forward and backward) against the PyTorch waves on the same terminal scores (R, T)."""
    from zoo.aog_rcnn import kernels

    maximise = parser.or_mode == "max"
    root_ref, _ = parser.bottom_up(terminals, maximise)
    root, choices = kernels.bottom_up(terminals.T, parser.kernel_tables, parser.grammar.root, maximise)
    assert root.shape == root_ref.shape and choices.shape == (parser.grammar.num_or, len(terminals))
    torch.testing.assert_close(root, root_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    finite = root.isfinite()
    if maximise:  # near-ties between trees break either way in float32: the kernel's tree must score its root
        torch.testing.assert_close(tree_score(parser, terminals, choices.T)[finite], root[finite], rtol=1e-5,
                                   atol=1e-5)
    grad_root = torch.randn(len(terminals), device=terminals.device)
    grad = kernels.top_down(grad_root, choices, parser.kernel_tables, parser.grammar.root, maximise)
    wave_choices = choices.index_select(0, parser.wave_order)  # the kernel's choices, as the waves read them
    expected = parser.top_down_gradient(grad_root, wave_choices, maximise)  # (R, T)
    torch.testing.assert_close(grad.T, expected, rtol=1e-5, atol=1e-6)
    assert (grad != 0).any()


def check_kernel_ties(parser: AOGParsing) -> None:
    """Exact ties in max mode (the mean's sums round in their own order): single cells score 0, larger terminals 0
    or -1, so many candidates are exactly 0, and the first maximum wins (the terminal, then the first AND child),
    as torch.max picks it."""
    from zoo.aog_rcnn import kernels

    device = parser.area.device
    tied = -torch.randint(0, 2, (300, parser.grammar.num_terminals), device=device).float()
    tied = torch.where(parser.area == 1, 0.0, tied)
    _, choices = kernels.bottom_up(tied.T, parser.kernel_tables, parser.grammar.root, True)
    assert torch.equal(choices.T, parser.choices_by_or(parser.bottom_up(tied, True)[1]))
    assert (choices == 0).any() and (choices == 1).any()


KERNEL_CASES = [(grid, mode) for grid in ((3, 3), (2, 4), (1, 3)) for mode in ("max", "mean")]


def run_kernel_checks() -> None:
    """Every KERNEL_CASES grammar and OR mode, on 200 rows of random terminal scores (one full block of rows and one
    partial block; two rows with a NaN, which must win as torch.max lets it) and on the cells' terminal scores (a
    strided (T, R) view); prints one line per check passed."""
    for grid, or_mode in KERNEL_CASES:
        torch.manual_seed(3)
        parser = AOGParsing(GridGrammar(*grid), or_mode)
        terminals = torch.randn(200, parser.grammar.num_terminals)
        terminals[7, 0] = terminals[150, -2] = math.nan
        check_kernels_against_the_waves(parser, terminals)
        check_kernels_against_the_waves(parser, parser.terminal_from_cells(torch.randn(200, grid[0] * grid[1])))
        if or_mode == "max":
            check_kernel_ties(parser)
        print("kernels agree", grid, or_mode)


def test_the_triton_dp_kernels_agree_with_the_waves() -> None:
    """The kernels in Triton's interpreter on the CPU (on a GPU they run compiled: the test below): the root scores,
    a tree that scores its root, and the gradient the waves give for the kernel's own choices. The interpreter is
    chosen when Triton first loads, so the checks run in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    from tests.conftest import REPO

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", "from tests.test_aog_rcnn import run_kernel_checks as run; run()"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("kernels agree") == len(KERNEL_CASES)


def test_the_triton_dp_kernels_compile_for_gpus_without_one() -> None:
    """Both wave kernels, both OR modes, float32 and bfloat16 scores, compiled by Triton to a cubin for sm_80 (A100)
    and sm_90 (H100/H200) on this machine, GPU or not: what the interpreter cannot see (types, layouts, lowering)."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from zoo.aog_rcnn import kernels

    up = {"term_ptr": None, "stride_node": "i32", "stride_row": "i32", "scores_ptr": "*fp32", "choices_ptr": "*u8",
          **{name: "*i64" for name in ("order_ptr", "start_ptr", "left_ptr", "right_ptr")}, "weight_ptr": "*fp32",
          "first_row": "i32", "rows": "i32", "MAXIMISE": "constexpr", "BLOCK": "constexpr", "SLOTS": "constexpr"}
    down = {"grad_root_ptr": None, "choices_ptr": "*u8", "grad_or_ptr": "*fp32", "grad_term_ptr": "*fp32",
            **{name: "*i64" for name in ("order_ptr", "start_ptr", "parent_start_ptr", "parent_or_ptr",
                                         "parent_slot_ptr")}, "parent_share_ptr": "*fp32", "first_row": "i32",
            "rows": "i32", "root_id": "i32", "MAXIMISE": "constexpr", "BLOCK": "constexpr", "PARENTS": "constexpr"}
    for kernel, signature, block in ((kernels._wave_up, up, "SLOTS"), (kernels._wave_down, down, "PARENTS")):
        for dtype in ("*fp32", "*bf16"):
            for maximise in (True, False):
                source = ASTSource(fn=kernel, signature={k: v or dtype for k, v in signature.items()},
                                   constexprs={"MAXIMISE": maximise, "BLOCK": kernels.BLOCK_ROWS, block: 16})
                for capability in (80, 90):
                    assert compile(source, target=GPUTarget("cuda", capability, 32)).asm["cubin"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("or_mode", ["max", "mean"])
def test_the_dp_runs_the_compiled_triton_kernels_on_cuda(or_mode: str) -> None:
    """On a GPU the parser runs the Triton kernels, which agree with the PyTorch waves (7x7, 512 x 21 rows) through
    the autograd node as well."""
    torch.manual_seed(5)
    parser = AOGParsing(GridGrammar(7, 7), or_mode, dp_kernel="triton").cuda()
    terminals = torch.randn(512 * 21, parser.grammar.num_terminals, device="cuda")
    assert parser.runs_triton(terminals)
    check_kernels_against_the_waves(parser, terminals)
    if or_mode == "max":
        check_kernel_ties(parser)
    grads = []
    for kernel in ("triton", "waves"):
        parser.dp_kernel = kernel
        x = terminals.clone().requires_grad_()
        root, _ = parser(x)
        root.sum().backward()
        grads.append((root.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    if or_mode == "mean":  # max: near-ties may pick other trees (the check above covers the kernel's own)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_the_dp_kernel_is_chosen_by_name_and_runs_the_waves_on_the_cpu() -> None:
    pytest.importorskip("triton")
    assert not AOGParsing(GridGrammar(3, 3), dp_kernel="triton").runs_triton(torch.zeros(4, 36))  # CPU: the waves
    with pytest.raises(ValueError, match="dp_kernel must be one of"):
        AOGParsing(GridGrammar(3, 3), dp_kernel="trition")
    detector = zoo.create_model("aog_rcnn_tinycnn", num_classes=3, dp_kernel="triton")
    assert detector.parser.dp_kernel == "triton"


def test_forcing_the_all_cells_tree_reproduces_the_average_vote() -> None:
    torch.manual_seed(2)
    parser = AOGParsing(GridGrammar(3, 3), "max")
    cells = torch.randn(5, 9)
    terminals = parser.terminal_from_cells(cells)
    forced = torch.where(parser.uniform_leaves(), terminals, torch.full_like(terminals, -1e4))
    root, choices = parser(forced)
    vote = AverageVoteHead()({"terminal_scores": cells[:, None], "box_regression": torch.zeros(5, 4)})
    torch.testing.assert_close(root, vote["class_logits"][:, 0])
    assert torch.equal(parser.parse_leaves(choices), parser.uniform_leaves().expand(5, -1))
    # With shared cell maps every tree scores the average vote (why the detector defaults to terminal maps).
    torch.testing.assert_close(parser(terminals)[0], cells.mean(1))


def test_gradients_reach_the_score_maps_through_the_whole_head() -> None:
    torch.manual_seed(3)
    grammar = GridGrammar(3, 3)
    pool, head = PositionSensitivePool(16, 5, grammar, "terminals"), AOGParsingHead(grammar, "max")
    features = {"0": torch.randn(2, 16, 12, 12)}
    proposals = [torch.tensor([[4.0, 4, 60, 40], [20, 30, 90, 90]]), torch.tensor([[0.0, 0, 95, 95]])]
    out = head(pool(features, proposals, [(96, 96)] * 2))
    (out["class_logits"].square().sum() + out["box_regression"].sum()).backward()
    assert pool.score_maps.weight.grad.abs().sum() > 0 and pool.box_maps.weight.grad.abs().sum() > 0
    assert "or_choices" not in out  # training takes the root scores alone (`AOGParsing.root_scores`)
    trained_grad = pool.score_maps.weight.grad.clone()
    pool.zero_grad()
    head.eval()  # eval parses: the same logits, and through the DP the same gradient
    parsed = head(pool(features, proposals, [(96, 96)] * 2))
    assert parsed["or_choices"].shape == (3, 5, grammar.num_or)
    torch.testing.assert_close(parsed["class_logits"], out["class_logits"])
    (parsed["class_logits"].square().sum() + parsed["box_regression"].sum()).backward()
    torch.testing.assert_close(pool.score_maps.weight.grad, trained_grad)


@pytest.mark.parametrize("rank", [None, 3])
def test_terminal_pooling_against_a_loop_reference(rank: int | None) -> None:
    torch.manual_seed(4)
    grammar = GridGrammar(2, 2)
    pool = PositionSensitivePool(8, 3, grammar, "terminals", terminal_rank=rank)
    features = torch.randn(2, 8, 10, 12)
    basis = features if rank is None else pool.terminal_basis(features)
    maps = pool.score_maps(basis).detach()  # every terminal's own 3 maps, computed as they are defined
    rois = rois_with_batch_index([torch.tensor([[3.0, 5, 70, 60]]), torch.tensor([[10.0, 0, 40, 79]])])
    scale = 1 / 8
    pooled = pool._pool_terminals(features, rois, scale)  # (K, C+1, T), via the features' integral image
    for k, roi in enumerate(rois):
        x1, y1, x2, y2 = (roi[1:] * scale).tolist()
        for t, (top, left, h, w) in enumerate(grammar.rects):
            bw, bh = (x2 - x1) / 2, (y2 - y1) / 2
            cx1 = min(max(math.floor(x1 + left * bw), 0), 11)
            cy1 = min(max(math.floor(y1 + top * bh), 0), 9)
            cx2 = max(min(math.ceil(x1 + (left + w) * bw), 12), cx1 + 1)
            cy2 = max(min(math.ceil(y1 + (top + h) * bh), 10), cy1 + 1)
            own = maps[int(roi[0]), 3 * t: 3 * t + 3, cy1:cy2, cx1:cx2].mean((1, 2))
            torch.testing.assert_close(pooled[k, :, t], own, rtol=1e-5, atol=1e-5)


def test_terminal_pooling_trains_after_a_first_call_under_inference_mode() -> None:
    """A first call under `torch.inference_mode` (as in Lightning's validation) must leave nothing cached (such as
    constant tensors per feature size) that a later training step's backward would save as an inference tensor."""
    pool = PositionSensitivePool(8, 3, GridGrammar(3, 3), "terminals")
    rois = rois_with_batch_index([torch.tensor([[0.0, 0, 60, 70]])])
    with torch.inference_mode():
        pool._pool_terminals(torch.randn(1, 8, 11, 10), rois, 1 / 8)
    features = torch.randn(1, 8, 11, 10, requires_grad=True)
    pool._pool_terminals(features, rois, 1 / 8).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize("rank", [None, 3])
def test_terminal_pooling_stays_float32_under_bf16_autocast(rank: int | None) -> None:
    """Box sums are differences of large running sums: under autocast they must not drop to bf16. Small integer
    features and basis weights make the basis maps exact in bf16 too, so any difference comes from the sums."""
    torch.manual_seed(6)
    pool = PositionSensitivePool(16, 4, GridGrammar(3, 3), "terminals", terminal_rank=rank)
    if rank:
        with torch.no_grad():
            pool.terminal_basis.weight.copy_(torch.randint(-2, 3, pool.terminal_basis.weight.shape))
            pool.terminal_basis.bias.zero_()
    features = torch.randint(-1, 5, (1, 16, 40, 40)).float()  # running sums reach thousands: bf16 keeps 3 digits
    rois = rois_with_batch_index([torch.tensor([[0.0, 0, 300, 310], [40, 80, 200, 150]])])
    exact = pool._pool_terminals(features, rois, 1 / 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pool._pool_terminals(features, rois, 1 / 8)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-4, atol=1e-4)


class TF32Operands(TorchDispatchMode):
    """Emulates TF32 on the CPU: the float32 operands of every convolution and matmul, forward and backward, rounded
    to TF32's 10-bit mantissa (round to nearest), products accumulated in float32, as cuDNN (`allow_tf32`, on by
    default) and cuBLAS (`torch.set_float32_matmul_precision("high")`) do on Ampere and later GPUs."""

    OPS: ClassVar = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default,
                     torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
                     torch.ops.aten.baddbmm.default}

    @staticmethod
    def rounded(value: Any) -> Any:
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32):
            return value
        bits = value.contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(value.shape)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in self.OPS:
            args, kwargs = tree_map(self.rounded, (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rank", [None, 8])
def test_terminal_pooling_keeps_its_box_sums_under_tf32(rank: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Box sums are differences of large running sums: no convolution or matmul may read the running sums as they
    are, or TF32 (emulated here, `TF32Operands`; only a GPU measures the real thing) rounds them to 10 bits and loses
    the small boxes. At VOC's size (480 px, a 30 x 30 map) with non-negative features, a conv on the features'
    integral image put errors of 78 % of the scores' std into the terminal scores and 11 % into the gradient of the
    score maps; TF32 on the maps themselves costs about 0.1 % (what it costs every other conv). The CPU is treated as
    a TF32 device here, as the emulation makes it one."""
    monkeypatch.setattr(aog_model, "TF32_DEVICE_TYPES", frozenset({"cpu"}))
    torch.manual_seed(0)
    pool = PositionSensitivePool(64, 21, GridGrammar(3, 3), "terminals", terminal_rank=rank)
    features = torch.rand(2, 64, 30, 30)
    corner, size = torch.rand(2, 64, 2) * 384, 16 + torch.rand(2, 64, 2) * 144  # boxes of 16 to 160 px
    rois = rois_with_batch_index(list(torch.cat([corner, (corner + size).clamp(max=479)], -1)))
    probe = torch.linspace(-1, 1, 128 * 21 * 36).view(128, 21, 36)  # a gradient that reaches every score

    def scores_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        pool.zero_grad()
        scores = pool._pool_terminals(features, rois, 1 / 16)  # (K, C+1, T)
        (scores * probe).sum().backward()
        return scores.detach(), pool.score_maps.weight.grad.clone()

    exact, exact_grad = scores_and_gradient()
    with TF32Operands():
        tf32, tf32_grad = scores_and_gradient()
    assert (tf32 - exact).abs().max() < 4e-3 * exact.std()
    assert (tf32_grad - exact_grad).abs().max() < 2e-2 * exact_grad.abs().max()


@pytest.mark.parametrize("rank", [None, 3])
def test_terminal_pooling_keeps_no_step_alive(rank: int | None) -> None:
    """Nothing of a step outlives it: an integral table cached by its feature tensor (an lru_cache left on it by
    mistake) kept every step's features and table, about 1.6 MiB a step at 128 px, for 256 steps."""
    import gc
    import weakref

    pool = PositionSensitivePool(16, 4, GridGrammar(3, 3), "terminals", terminal_rank=rank)
    features = torch.rand(1, 16, 12, 12, requires_grad=True)
    rois = rois_with_batch_index([torch.tensor([[0.0, 0, 90, 80]])])
    pool._pool_terminals(features, rois, 1 / 8).sum().backward()
    alive = weakref.ref(features)
    del features
    gc.collect()
    assert alive() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [None, 8])
def test_terminal_pooling_keeps_its_box_sums_under_gpu_tf32(rank: int | None) -> None:
    """The emulated test above, on a GPU with TF32 on for cuDNN convolutions and cuBLAS matmuls (what Ampere and
    later GPUs run once `torch.set_float32_matmul_precision("high")` is set): scores and gradient against the CPU's."""
    torch.manual_seed(0)
    pool = PositionSensitivePool(64, 21, GridGrammar(3, 3), "terminals", terminal_rank=rank)
    features = torch.rand(2, 64, 30, 30)
    corner, size = torch.rand(2, 64, 2) * 384, 16 + torch.rand(2, 64, 2) * 144
    rois = rois_with_batch_index(list(torch.cat([corner, (corner + size).clamp(max=479)], -1)))
    probe = torch.linspace(-1, 1, 128 * 21 * 36).view(128, 21, 36)

    def scores_and_gradient(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        pool.to(device).zero_grad()
        scores = pool._pool_terminals(features.to(device), rois.to(device), 1 / 16)
        (scores * probe.to(device)).sum().backward()
        return scores.detach().cpu(), pool.score_maps.weight.grad.cpu()

    exact, exact_grad = scores_and_gradient("cpu")
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        gpu, gpu_grad = scores_and_gradient("cuda")
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    assert (gpu - exact).abs().max() < 4e-3 * exact.std()
    assert (gpu_grad - exact_grad).abs().max() < 2e-2 * exact_grad.abs().max()


def test_terminal_pooling_tf32_form_changes_nothing_without_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TF32, the maps-first form that TF32 devices run gives the CPU form's scores and gradients."""
    torch.manual_seed(3)
    pool = PositionSensitivePool(16, 4, GridGrammar(3, 3), "terminals")
    features = torch.rand(2, 16, 12, 12, requires_grad=True)
    rois = rois_with_batch_index([torch.tensor([[0.0, 0, 90, 80], [10, 20, 60, 40]]), torch.tensor([[5.0, 5, 95, 95]])])

    def run() -> list[torch.Tensor]:
        pool.zero_grad()
        features.grad = None
        scores = pool._pool_terminals(features, rois, 1 / 8)
        (scores * torch.linspace(-1, 1, scores.numel()).view_as(scores)).sum().backward()
        return [scores.detach(), features.grad.clone(), pool.score_maps.weight.grad.clone()]

    plain = run()
    monkeypatch.setattr(aog_model, "TF32_DEVICE_TYPES", frozenset({"cpu"}))
    for maps_first, exact in zip(run(), plain):
        torch.testing.assert_close(maps_first, exact, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- the detector
def scenes(count: int = 2, size: int = 96) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(5)
    images = [torch.rand(3, size, size) for _ in range(count)]
    targets = [{"boxes": torch.tensor([[8.0, 10, 40, 44], [50, 40, 90, 80]]), "labels": torch.tensor([1, 2])}
               for _ in range(count)]
    return images, targets


@pytest.mark.parametrize("name", DETECTOR_MODELS)
def test_detector_contract(name: str) -> None:
    model = zoo.create_model(name, num_classes=3, image_size=96)
    images, targets = scenes()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "scores", "labels", "leaf_boxes"} <= set(detections[0])
    boxes, leaf_boxes = detections[0]["boxes"], detections[0]["leaf_boxes"]  # (D, 4), (D, T, 4): T = 36 at 3x3
    assert leaf_boxes.shape == (len(boxes), 36, 4)
    assert (leaf_boxes[..., :2] >= boxes[:, None, :2] - 1e-4).all()
    assert (leaf_boxes[..., 2:] <= boxes[:, None, 2:] + 1e-4).all()
    fixed = model.fixed_partitions()  # the cells tile the box; the whole-box leaf is the box
    assert int(fixed["grid"].sum()) == 9 and torch.allclose(leaf_boxes[:, fixed["box"]][:, 0], boxes)
    if name.startswith("aog"):
        leaves = detections[0]["parse_leaves"]  # (D, T): every parse tree partitions the grid exactly once
        cover = leaves.float() @ (model.parser.cell_weights * model.parser.area[:, None].float())  # (D, H*W)
        assert len(leaves) == len(detections[0]["boxes"]) and torch.equal(cover, torch.ones_like(cover))


def test_detector_rejects_bad_input() -> None:
    model = zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=96)
    images, targets = scenes()
    with pytest.raises(ValueError, match="image 0 of the list\\) expects images of shape \\(3, H, W\\)"):
        model([torch.rand(1, 96, 96)], targets[:1])
    with pytest.raises(ValueError, match="image 1 of the list\\) expects images"):
        model([images[0], (images[1] * 255).byte()], targets)
    with pytest.raises(TypeError, match="list of"):
        model(torch.stack(images), targets)
    with pytest.raises(ValueError, match="outside \\[1, 3\\]"):
        model(images, [{**t, "labels": torch.tensor([0, 4])} for t in targets])
    with pytest.raises(ValueError, match="or_mode"):
        model.or_mode = "min"
    baseline = zoo.create_model("vote_rcnn_tinycnn", num_classes=3, image_size=96)
    baseline.or_mode = "max"  # a stage setting written for AOG: the twins ignore it, but not a wrong value
    assert baseline.or_mode is None
    with pytest.raises(ValueError, match="or_mode"):
        baseline.or_mode = "min"
    with pytest.raises(ValueError, match="terminal_rank"):
        zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=96, terminal_maps="cells", terminal_rank=8)
    with pytest.raises(ValueError, match="terminal_rank"):
        zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=96, terminal_rank=0)


def test_low_rank_terminal_maps_train_in_the_detector() -> None:
    """terminal_rank r: the detector trains end to end through the r basis maps, with fewer head parameters."""
    full = zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=96)
    low = zoo.create_model("aog_rcnn_tinycnn", num_classes=3, image_size=96, terminal_rank=8)
    pool = low.roi_heads.box_roi_pool
    assert pool.terminal_basis.out_channels == 8 and pool.score_maps.in_channels == 8
    count = lambda m: sum(p.numel() for p in m.roi_heads.parameters())  # noqa: E731
    assert count(low) < count(full)
    images, targets = scenes()
    sum(low(images, targets).values()).backward()
    assert pool.terminal_basis.weight.grad.abs().sum() > 0 and pool.score_maps.weight.grad.abs().sum() > 0


def test_post_processing_keeps_torchvisions_detections() -> None:
    """ParsingRoIHeads tracks each detection's proposal; boxes, scores and labels stay torchvision's."""
    torch.manual_seed(6)
    model = zoo.create_model("aog_rcnn_tinycnn", num_classes=4, image_size=96).eval()
    heads = model.roi_heads
    proposals = [torch.rand(30, 2).mul(40).repeat(1, 2) + torch.tensor([0, 0, 30, 30.0]) for _ in range(2)]
    logits, deltas = torch.randn(60, 5) * 3, torch.randn(60, 20) * 0.1
    ours = heads._detections(logits, deltas, proposals, [(96, 96)] * 2, None)
    boxes, scores, labels = RoIHeads.postprocess_detections(heads, logits, deltas, proposals, [(96, 96)] * 2)
    for mine, b, s, l in zip(ours, boxes, scores, labels):
        assert torch.equal(mine["boxes"], b) and torch.equal(mine["scores"], s) and torch.equal(mine["labels"], l)


@pytest.mark.parametrize("name", DETECTOR_MODELS)
def test_boxes_are_decoded_in_float32_under_bf16_autocast(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's BoxCoder decodes in the deltas' dtype: under bf16 autocast the RPN's conv deltas and the RoI
    heads' deltas (the Faster R-CNN twin's Linear) are bf16, and at 320 px bf16 boxes lie 2 px apart. Every coder of
    every detector decodes in float32: proposals and detections are float32 and equal torchvision's float32 decode
    of the same deltas, as do the training targets the coders encode."""
    from torchvision.models.detection._utils import BoxCoder

    torch.manual_seed(9)
    model = zoo.create_model(name, num_classes=3, image_size=320)
    model.roi_heads.score_thresh = 0.0  # detections from an untrained model
    calls: list[tuple[str, BoxCoder, torch.Tensor, list[torch.Tensor], torch.Tensor]] = []
    for part in (model.rpn, model.roi_heads):
        coder = part.box_coder

        def recorded(codes: torch.Tensor, boxes: list[torch.Tensor], coder: BoxCoder = coder) -> torch.Tensor:
            out = type(coder).decode(coder, codes, boxes)
            calls.append(("decode", coder, codes, boxes, out))
            return out

        def recorded_encode(targets: list[torch.Tensor], boxes: list[torch.Tensor],
                            coder: BoxCoder = coder) -> tuple[torch.Tensor, ...]:
            out = type(coder).encode(coder, targets, boxes)
            calls.append(("encode", coder, targets, boxes, torch.cat(out)))
            return out

        monkeypatch.setattr(coder, "decode", recorded)
        monkeypatch.setattr(coder, "encode", recorded_encode)
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[28.0, 30, 141, 150], [180, 170, 301, 310]]), "labels": torch.tensor([1, 2])}
               for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, targets)
        model.eval()
        with torch.no_grad():
            detections = model(images)
    assert {kind for kind, *_ in calls} == {"decode", "encode"}
    assert {id(coder) for _, coder, *_ in calls} == {id(model.rpn.box_coder), id(model.roi_heads.box_coder)}
    for kind, coder, first, second, out in calls:
        assert out.dtype == torch.float32, f"{kind} gave {out.dtype}"
        reference = BoxCoder(coder.weights, coder.bbox_xform_clip)
        if kind == "decode":
            expected = reference.decode(first.float(), [b.float() for b in second])
        else:
            expected = torch.cat(reference.encode([t.float() for t in first], [b.float() for b in second]))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for found in detections:
        assert found["boxes"].dtype == found["scores"].dtype == found["leaf_boxes"].dtype == torch.float32
        assert len(found["boxes"]) > 0


@pytest.mark.parametrize("name", ["aog_rcnn_tinycnn", "vote_rcnn_tinycnn"])
def test_leaf_boxes_are_rescaled_with_their_boxes_to_the_input_size(name: str) -> None:
    """Inputs of other sizes than `image_size` (VOC's): torchvision maps "boxes" back to each input's pixels, and
    the leaves go with them, by the same `resize_boxes`: inside (or on) their box, the whole-box leaf the box."""
    from torchvision.models.detection.transform import resize_boxes

    torch.manual_seed(7)
    model = zoo.create_model(name, num_classes=3, image_size=64).eval()
    model.roi_heads.score_thresh = 0.0  # detections from an untrained model
    images = [torch.rand(3, 128, 160), torch.rand(3, 48, 40), torch.rand(3, 64, 64), torch.rand(3, 90, 200)]
    with torch.no_grad():
        detections = model(images)
        resized, _ = model.transform(images)  # the parent's steps, with the leaves rescaled by hand
        features = model.backbone(resized.tensors)
        proposals, _ = model.rpn(resized, features)
        raw, _ = model.roi_heads(features, proposals, resized.image_sizes)
    fixed = model.fixed_partitions()
    for image, found, before, size in zip(images, detections, raw, resized.image_sizes):
        boxes, leaves = found["boxes"], found["leaf_boxes"]  # (D, 4), (D, T, 4)
        assert len(boxes) > 0 and leaves.shape == (len(boxes), 36, 4)
        assert (leaves[..., :2] >= boxes[:, None, :2] - 1e-3).all()
        assert (leaves[..., 2:] <= boxes[:, None, 2:] + 1e-3).all()
        torch.testing.assert_close(leaves[:, fixed["box"]][:, 0], boxes)
        by_hand = resize_boxes(before["leaf_boxes"].reshape(-1, 4), size, tuple(image.shape[1:]))
        assert torch.equal(leaves, by_hand.reshape(leaves.shape))
        torch.testing.assert_close(leaves, model.roi_heads.grid.leaf_boxes(boxes))  # the grid laid in the box


# ------------------------------------------------------------------------------------------------ the metric
def test_parse_part_iou_on_hand_built_boxes() -> None:
    metric = ParsePartIoU()
    box = torch.tensor([[0.0, 0, 30, 30]])
    leaves = torch.tensor([[[0.0, 0, 10, 10], [10, 0, 30, 30], [0, 10, 10, 30]]])  # a 3-leaf partition
    pred = {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "leaf_boxes": leaves,
            "leaf_mask": torch.tensor([[True, True, False]])}  # the third leaf is not in the tree
    target = {"boxes": torch.tensor([[0.0, 0, 30, 29]]), "labels": torch.tensor([1]),
              "part_boxes": torch.tensor([[[0.0, 0, 10, 10], [10, 0, 30, 15]]])}
    missed = {"boxes": torch.tensor([[50.0, 50, 60, 60]]), "labels": torch.tensor([2]),
              "part_boxes": torch.tensor([[[50.0, 50, 55, 55], [55, 55, 60, 60]]])}
    metric.update([pred, {**pred, "labels": torch.tensor([1])}], [target, missed])
    result = metric.compute()
    # part 1 = leaf 1 (IoU 1); part 2 (20x15) inside leaf 2 (20x30): IoU 0.5. Leaf 1 -> 1, leaf 2 -> 0.5.
    assert result["part_recall"].item() == pytest.approx(0.75)
    assert result["leaf_precision"].item() == pytest.approx(0.75)
    assert result["part_iou"].item() == pytest.approx(0.75)
    assert result["matched"].item() == pytest.approx(0.5) and result["leaves"].item() == 2


def test_parse_part_iou_is_float32_under_bf16_autocast() -> None:
    """Validation runs under the trainer's autocast: the leaf precision (a matmul of the leaf mask with each leaf's
    best part IoU) summed 36 IoUs in bf16 there (3 significant digits). Under autocast the metric equals the float32
    one, and `partition_scores` returns float32."""
    from zoo.aog_rcnn.metrics import partition_scores

    torch.manual_seed(10)
    corner, size = torch.rand(6, 36, 2) * 60, 5 + torch.rand(6, 36, 2) * 40
    leaves = torch.cat([corner, corner + size], -1)  # (D, T, 4) 6 detections of 36 leaves each
    part_corner = torch.rand(6, 4, 2) * 60
    parts = torch.cat([part_corner, part_corner + 10 + torch.rand(6, 4, 2) * 30], -1)  # (G, P, 4)
    boxes = torch.tensor([[0.0, 0, 100, 100]]).repeat(6, 1)  # every object matched by the detection of its index
    pred = {"boxes": boxes + torch.arange(6.0)[:, None] * 200, "scores": torch.rand(6), "labels": torch.ones(6).long(),
            "leaf_boxes": leaves, "leaf_mask": torch.rand(6, 36) < 0.7}
    target = {"boxes": pred["boxes"].clone(), "labels": pred["labels"], "part_boxes": parts}
    results = []
    for autocast in (False, True):
        metric = ParsePartIoU()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            metric.update([pred], [target])
            results.append(metric.compute())
            scores = partition_scores(torch.rand(3, 4, 36), torch.rand(3, 2, 36) < 0.5)
        assert all(score.dtype == torch.float32 for score in scores)
    assert results[0]["matched"] == 1
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-6, atol=1e-7, msg=key)


# ----------------------------------------------------------------------------------------------------- the data
def test_scene_world_ground_truth() -> None:
    dm = PartsWorldScenesDataModule(num_train=24, num_val=8, num_test=8, canvas_size=96, object_sizes=(32, 48))
    dm.setup()
    again = PartsWorldScenesDataModule(num_train=24, num_val=8, num_test=8, canvas_size=96, object_sizes=(32, 48),
                                       seed=0)
    again.setup()
    for i in range(8):
        image, target = dm.splits["train"][i]
        assert image.shape == (3, 96, 96) and torch.equal(image, again.splits["train"][i][0])
        boxes, parts = target["boxes"], target["part_boxes"]
        assert 1 <= len(boxes) <= 4 and ((target["labels"] >= 1) & (target["labels"] <= 4)).all()
        assert (parts[..., :2] >= boxes[:, None, :2] - 1e-4).all()
        assert (parts[..., 2:] <= boxes[:, None, 2:] + 1e-4).all()
        inter = torch.ops.torchvision.nms(boxes, torch.ones(len(boxes)), 0.0)  # disjoint boxes all survive NMS at 0
        assert len(inter) == len(boxes)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["images"], list) and len(batch["images"]) == len(batch["targets"]) == 8
    with pytest.raises(ValueError, match="object_sizes"):
        PartsWorldScenesDataModule(canvas_size=64, object_sizes=(40, 80))


def test_voc_loader_reads_the_release_layout(voc_root: Path) -> None:
    dm = VOCDataModule(root=str(voc_root), train_split="train", val_split="val", flip=False)
    dm.setup()
    image, target = dm.splits["train"][0]
    assert image.shape == (3, 48, 64)
    # 000005: the difficult person is dropped in training, kept (flagged) for evaluation
    assert target["labels"].tolist() == [9]  # chair
    torch.testing.assert_close(target["boxes"], torch.tensor([[9.0, 7, 40, 30]]))
    _, val = dm.splits["val"][0]
    assert val["labels"].tolist() == [12, 8] and not val["difficult"].any()
    assert len(dm.splits["test"]) == 1 and dm.num_classes == 20


def test_voc_loader_errors_name_the_problem(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        VOCDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetLayoutError, match="split file"):
        VOCDataModule(root=str(voc_root), train_split="trainval").setup()
    base = voc_root / "VOC2007"
    (base / "Annotations" / "000007.xml").write_text("<annotation><object><name>car")
    with pytest.raises(ValueError, match="000007.xml.*not valid XML"):
        VOCDataModule(root=str(voc_root), train_split="train", val_split="val", test_split="val").setup()
    (base / "Annotations" / "000007.xml").write_text(
        "<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>")
    with pytest.raises(ValueError, match="unicorn.*20 VOC classes"):
        VOCDataModule(root=str(voc_root), train_split="train", val_split="val", test_split="val").setup()
    dm = VOCDataModule(root=str(voc_root), train_split="val", val_split="val", test_split="val")
    dm.setup()
    (base / "JPEGImages" / "000009.jpg").unlink()  # gone after setup: loading it names the file
    with pytest.raises(DatasetLayoutError, match="000009.jpg"):
        dm.splits["train"][0]
    with pytest.raises(DatasetLayoutError, match="000009.jpg"):  # gone before: setup refuses
        VOCDataModule(root=str(voc_root), train_split="val", val_split="val", test_split="val").setup()


def test_voc_truncated_image_names_the_file(voc_root: Path) -> None:
    victim = voc_root / "VOC2007" / "JPEGImages" / "000005.jpg"
    victim.write_bytes(victim.read_bytes()[:40])
    dm = VOCDataModule(root=str(voc_root), train_split="train", val_split="val", test_split="val")
    dm.setup()
    with pytest.raises(ValueError, match="Cannot read image .*000005.jpg"):
        dm.splits["train"][0]


# --------------------------------------------------------------------------------------------------- the system
class RecordOrMode(pl.Callback):
    """The OR mode each training epoch runs in."""

    def __init__(self) -> None:
        self.modes: list[str | None] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            self.modes.append(pl_module.model.or_mode)


def test_detection_system_schedule_and_bad_batches(tmp_path: Path) -> None:
    from zoo.aog_rcnn.callback import ParseTreeCallback
    from zoo.aog_rcnn.system import AOGRCNNSystem

    dm = PartsWorldScenesDataModule(num_train=8, num_val=4, num_test=4, canvas_size=96, object_sizes=(32, 48),
                                    batch_size=4)
    system = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96, unfold_epoch=1)
    modes = RecordOrMode()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=pl.loggers.TensorBoardLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[ParseTreeCallback(num_images=2, score_threshold=0.0), modes])
    trainer.fit(system, datamodule=dm)
    assert modes.modes == ["mean", "max"]  # epoch 0 folded, epoch 1 unfolded
    assert trainer.callback_metrics["schedule/stage"] == 1.0  # stage 1: unfolding
    assert {"val/map_50", "val/map", "val/parse_part_iou", "val/grid_part_iou", "val/box_part_iou"} <= set(
        trainer.callback_metrics)
    assert (Path(trainer.log_dir) / "parse_trees" / "epoch1.png").is_file()
    assert AOGRCNNSystem(**system.hparams).schedule.stages == system.schedule.stages  # as a checkpoint reloads it
    with pytest.raises(ValueError, match="unfold_epoch or stages"):
        AOGRCNNSystem(unfold_epoch=1, stages=[{"name": "all"}])
    with pytest.raises(ValueError, match="takes no loss"):
        AOGRCNNSystem(loss=torch.nn.MSELoss())
    images, targets = scenes(size=96)
    with pytest.raises(TypeError, match="Detection batches are"):
        system.training_step({"image": images[0]}, 0)


def test_the_or_mode_is_saved_and_every_load_path_restores_it(tmp_path: Path) -> None:
    """An unfolded model ("max") reloads unfolded, scoring as trained: from a System checkpoint (zoo.load_checkpoint,
    load_from_checkpoint, a Trainer's ckpt_path as `train.py validate|test|predict --ckpt_path`) and from an
    export; the stages set the mode only when a training epoch starts. Weights saved before the mode was (no
    "_extra_state") still load strictly, keeping the model's default."""
    from zoo.aog_rcnn.system import AOGRCNNSystem

    dm = PartsWorldScenesDataModule(num_train=4, num_val=4, num_test=4, canvas_size=96, object_sizes=(32, 48),
                                    batch_size=4)
    system = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96, unfold_epoch=1)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(system, datamodule=dm)
    path = tmp_path / "unfolded.ckpt"
    trainer.save_checkpoint(path)
    trained = system.model.eval()
    assert trained.or_mode == "max"
    images = scenes(count=2, size=80)[0]

    def detect(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        model.eval().roi_heads.score_thresh = 0.0  # every (proposal, class): the scores of an untrained model
        with torch.no_grad():
            return model(images)

    expected = detect(trained)
    trained.or_mode = "mean"
    folded = detect(trained)
    trained.or_mode = "max"
    assert not torch.equal(folded[0]["scores"], expected[0]["scores"])  # the mode changes the scores

    fresh = AOGRCNNSystem(num_classes=dm.num_classes, image_size=96, unfold_epoch=1)  # "mean" until an epoch starts
    assert fresh.model.or_mode == "mean"
    pl.Trainer(limit_val_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False).validate(fresh, datamodule=dm, ckpt_path=path)
    loaded = {"load_checkpoint": zoo.load_checkpoint(path),
              "load_from_checkpoint": AOGRCNNSystem.load_from_checkpoint(path).model,
              "load_exported": zoo.load_exported(zoo.export_checkpoint(path, tmp_path / "export")),
              "Trainer ckpt_path": fresh.model}
    for how, model in loaded.items():
        assert model.or_mode == "max", how
        for ours, theirs in zip(detect(model), expected):
            for key in ("boxes", "scores", "labels", "leaf_boxes", "parse_leaves"):
                assert torch.equal(ours[key], theirs[key]), (how, key)

    old = torch.load(path, weights_only=True)  # as written before the OR mode was saved
    assert old["state_dict"].pop("model.roi_heads.box_head._extra_state").item() == 1  # OR_MODES.index("max")
    torch.save(old, tmp_path / "old.ckpt")
    assert zoo.load_checkpoint(tmp_path / "old.ckpt").or_mode == "mean"
    assert AOGRCNNSystem.load_from_checkpoint(tmp_path / "old.ckpt").model.or_mode == "mean"


def test_twins_are_the_registered_baselines() -> None:
    from zoo.aog_rcnn.system import AOGRCNNSystem
    from zoo.cli.compare import declared_twins

    twins = declared_twins("aog.yaml", {"model": {"class_path": "zoo.aog_rcnn.system.AOGRCNNSystem",
                                                  "init_args": {"model_name": "aog_rcnn_resnet18"}}})
    assert set(twins) == set(AOGRCNNSystem.TWINS) == {"average_vote", "two_mlp_head"}
    names = [arg.split("=")[1] for args in twins.values() for arg in args if "model_name" in arg]
    assert names == ["vote_rcnn_resnet18", "faster_rcnn_resnet18"] and set(names) <= set(DETECTOR_MODELS)


# ------------------------------------------------------------------------------------- audit fixes (AOG family)
def photographs_of_their_own_sizes(voc_root: Path) -> Path:
    """The VOC fixture with 000007 as an 80x40 photograph (the others are 64x48): real VOC images differ in size."""
    from tests.conftest import voc_annotation, write_image

    base = voc_root / "VOC2007"
    write_image(base / "JPEGImages" / "000007.jpg", (80, 40), seed=7)
    (base / "Annotations" / "000007.xml").write_text(
        voc_annotation("000007", [("car", (2, 10, 70, 38), 0)]).replace("<width>64</width><height>48</height>",
                                                                       "<width>80</width><height>40</height>"))
    return base


def test_pictures_and_predictions_of_images_of_different_sizes(voc_root: Path, tmp_path: Path) -> None:
    """A VOC fit with the parse-tree pictures runs on photographs of different sizes (their canvases could not be
    tiled: the first validation crashed and the epoch was lost), and `predict` writes one row per detection, named by
    the image's id, its box and parse leaves in the image's own pixels, and pictures (it wrote nothing)."""
    import csv

    from zoo.aog_rcnn.callback import ParseTreeCallback
    from zoo.aog_rcnn.system import AOGRCNNSystem
    from zoo.cli.predict import PredictionWriter

    photographs_of_their_own_sizes(voc_root)
    dm = VOCDataModule(root=str(voc_root), train_split="train", val_split="train", test_split="train", flip=False,
                       image_size=64, batch_size=2)
    pl.seed_everything(0)
    system = AOGRCNNSystem(num_classes=dm.num_classes, image_size=64, class_names=dm.class_names)
    system.model.roi_heads.score_thresh = 0.0  # an untrained detector's scores (about 1/21) would all be dropped
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=pl.loggers.TensorBoardLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ParseTreeCallback(num_images=2, score_threshold=0.0)])
    trainer.fit(system, datamodule=dm)
    assert (Path(trainer.log_dir) / "parse_trees" / "epoch0.png").is_file()

    writer = PredictionWriter(max_pictures=1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         callbacks=[writer])
    trainer.predict(system, datamodule=dm, return_predictions=False)
    folder = tmp_path / "predictions"
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert {row["file"] for row in rows} == {"000005", "000007"}
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png"]  # max_pictures=1
    system.eval()
    images = [dm.splits["test"][index][0] for index in (0, 1)]  # one batch, as predict ran it (batches pad images)
    with torch.no_grad():
        detections = system(images)
    for index, (file, image, found) in enumerate(zip(["000005", "000007"], images, detections)):
        mine = [row for row in rows if row["file"] == file]
        assert len(mine) == max(1, len(found["boxes"])) and all(int(row["index"]) == index for row in mine)
        assert len(found["boxes"])
        boxes = torch.tensor([[float(row[k]) for k in ("x1", "y1", "x2", "y2")] for row in mine])
        torch.testing.assert_close(boxes, found["boxes"], atol=0.051, rtol=0)  # written to 0.1 pixel
        assert (boxes[:, 2] <= image.shape[-1] + 0.05).all() and (boxes[:, 3] <= image.shape[-2] + 0.05).all()
        assert [row["label_name"] for row in mine] == [dm.class_names[int(k) - 1] for k in found["labels"]]
        leaves = [[float(v) for v in rect.split()] for rect in mine[0]["parse_leaves"].split("; ")]
        expected = found["leaf_boxes"][0][found["parse_leaves"][0]]
        torch.testing.assert_close(torch.tensor(leaves), expected, atol=0.051, rtol=0)


def test_map_leaves_out_difficult_objects_as_the_voc_devkit_does() -> None:
    """A detection inside a difficult object's box that overlaps it little is a false positive for VOC's devkit
    (COCO's crowd rule, used before, excused it: mAP@0.5 1.0); one overlapping it well is neither hit nor miss."""
    from zoo.aog_rcnn.metrics import DetectionAP

    car, difficult_car = [0.0, 0.0, 50, 50], [100.0, 100, 200, 200]
    target = {"boxes": torch.tensor([car, difficult_car]), "labels": torch.tensor([1, 1]),
              "difficult": torch.tensor([False, True])}

    def map_50(extra_box: list[float]) -> float:
        metric = DetectionAP()
        metric.update([{"boxes": torch.tensor([car, extra_box]), "scores": torch.tensor([0.9, 0.95]),
                        "labels": torch.tensor([1, 1])}], [target])
        return metric.compute()["map_50"].item()

    assert map_50([140.0, 140, 160, 160]) == pytest.approx(0.5)  # IoU 0.04 with the difficult box: false positive
    assert map_50([102.0, 102, 198, 198]) == pytest.approx(1.0)  # IoU 0.92: ignored
    assert map_50([300.0, 300, 340, 340]) == pytest.approx(0.5)  # overlaps nothing: false positive


def test_voc_boxes_past_the_image_are_clipped_with_a_warning(voc_root: Path) -> None:
    """A box reaching past the image (<size>) was loaded as it was, where no detection can match it."""
    from datamodules.voc import read_annotation
    from tests.conftest import voc_annotation

    path = voc_root / "VOC2007" / "Annotations" / "000007.xml"
    path.write_text(voc_annotation("000007", [("car", (0, -5, 400, 30), 0), ("dog", (5, 5, 20, 20), 0)]))
    with pytest.warns(UserWarning, match=r"000007.xml: clipped to the 64x48 image.*object 0 \(car\)"):
        target = read_annotation(path)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 64, 30], [4, 4, 20, 20]]))
    path.write_text(voc_annotation("000007", [("car", (70, 5, 90, 20), 0)]))
    with pytest.raises(DatasetLayoutError, match="object 0 \\(car\\) has an empty box .* inside the 64x48 image"):
        read_annotation(path)


def test_reports_give_the_leaf_count_no_direction() -> None:
    """compare/ablate reports said "higher is better" of the parse / grid / box leaf counts."""
    from zoo.aog_rcnn.system import AOGRCNNSystem
    from zoo.cli.report import direction, legend, metric_directions

    directions = metric_directions(AOGRCNNSystem(num_classes=4, image_size=64), "test")
    assert direction("parse_leaves", directions) is None and direction("box_leaves_mean", directions) is None
    assert direction("parse_part_iou", directions) is True and direction("grid_matched", directions) is True
    assert legend(["map_50", "parse_leaves", "parse_part_iou"], directions) == \
        "higher is better: map_50, parse_part_iou"
