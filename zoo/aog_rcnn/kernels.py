"""The AOG DP as Triton kernels: one launch per wave of rectangles forward, and one per wave backward.

`AOGParsing`'s PyTorch DP runs five kernels per wave of rectangles forward and six backward (H + W - 1 waves): on a
GPU, with 512 RoIs x 21 classes of rows, that is about 140 launches of tiny kernels at 7x7. Here each wave is one
launch. Its programs take one OR node of the wave and a block of rows each, all of the OR's AND children at once (a
(slots, rows) block). Every child sits in an earlier wave, finished by an earlier launch. The backward pulls instead
of pushing: in reverse wave order, each OR sums what its parents (every AND that has it as a child, in later waves,
finished) pass down to it. So no program writes where another reads or writes, there are no atomics, and the gradient
is deterministic.

Used on CUDA tensors with `AOGParsing(dp_kernel="triton")` when Triton is importable; the PyTorch waves are the
fallback and the reference: tests run these kernels in Triton's interpreter on the CPU (TRITON_INTERPRET=1, where
they take CPU tensors) and compiled on a GPU, and compare them with the waves.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the PyTorch DP runs everywhere
    triton = None

BLOCK_ROWS = 128


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _wave_up(term_ptr, stride_node, stride_row, scores_ptr, choices_ptr,
                 order_ptr, start_ptr, left_ptr, right_ptr, weight_ptr, first_row, rows,
                 MAXIMISE: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
        """One wave: the score (float32) and choice (uint8) of OR `order[first_row + program_id(0)]` for a block of
        rows, written at its OR id in (num_or, rows) tables. An OR's candidates: its terminal (choice 0), then its AND
        children w * left + (1 - w) * right (choice j for the j-th), as torch.lerp computes them, all SLOTS (a power
        of two >= the most AND children of an OR) at once; the first maximum wins, and NaN wins as in torch.max."""
        node = tl.load(order_ptr + first_row + tl.program_id(0)).to(tl.int64)
        r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        j = tl.arange(0, SLOTS)
        term = tl.load(term_ptr + node * stride_node + r * stride_row, mask=live, other=0.0).to(tl.float32)
        first = tl.load(start_ptr + node)
        count = tl.load(start_ptr + node + 1) - first  # AND children
        has = j < count
        slot = first + j
        w = tl.load(weight_ptr + slot, mask=has, other=0.0)[:, None]  # (SLOTS, 1)
        both = has[:, None] & live[None, :]
        left = tl.load(scores_ptr + tl.load(left_ptr + slot, mask=has, other=0).to(tl.int64)[:, None] * rows
                       + r[None, :], mask=both, other=0.0)  # (SLOTS, BLOCK)
        right = tl.load(scores_ptr + tl.load(right_ptr + slot, mask=has, other=0).to(tl.int64)[:, None] * rows
                        + r[None, :], mask=both, other=0.0)
        diff = left - right  # torch.lerp(right, left, w), both of its branches
        value = tl.where(w < 0.5, right + w * diff, left - diff * (1.0 - w))
        clean = tl.where(has[:, None] & (value == value), value, float("-inf"))  # NaN: handled below
        best_and = tl.max(clean, axis=0)
        first_best = tl.argmax(clean, axis=0, tie_break_left=True)
        take = best_and > term  # ties go to the terminal, the first candidate
        best = tl.where(take, best_and, term)
        choice = tl.where(take, first_best + 1, 0)
        nan = tl.where(has[:, None] & (value != value), 1, 0)
        nan_child = tl.max(nan, axis=0) > 0
        choice = tl.where(term != term, 0, tl.where(nan_child, tl.argmax(nan, axis=0, tie_break_left=True) + 1,
                                                    choice))
        best = tl.where((term != term) | nan_child, float("nan"), best)
        if MAXIMISE:
            out = best
        else:
            out = (term + tl.sum(tl.where(has[:, None], value, 0.0), axis=0)) / (count + 1).to(tl.float32)
        tl.store(scores_ptr + node * rows + r, out, mask=live)
        tl.store(choices_ptr + node * rows + r, choice.to(tl.uint8), mask=live)

    @triton.jit
    def _wave_down(grad_root_ptr, choices_ptr, grad_or_ptr, grad_term_ptr, order_ptr, start_ptr,
                   parent_start_ptr, parent_or_ptr, parent_slot_ptr, parent_share_ptr, first_row, rows, root_id,
                   MAXIMISE: tl.constexpr, BLOCK: tl.constexpr, PARENTS: tl.constexpr):
        """One wave, in reverse order: the gradient of OR `order[first_row + program_id(0)]` for a block of rows, the
        sum of what each of its parents passes down (an OR passes its gradient to its chosen child (max) or shares it
        equally among its children (mean); an AND passes it to its two children in proportion to their areas), to
        grad_or (num_or, rows), and its terminal's share to grad_term (num_or, rows). The root takes grad_root."""
        node = tl.load(order_ptr + first_row + tl.program_id(0)).to(tl.int64)
        r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        jj = tl.arange(0, PARENTS)
        first = tl.load(parent_start_ptr + node)
        has = jj < tl.load(parent_start_ptr + node + 1) - first
        parent = tl.load(parent_or_ptr + first + jj, mask=has, other=0).to(tl.int64)  # (PARENTS,) OR ids
        share = tl.load(parent_share_ptr + first + jj, mask=has, other=0.0)[:, None]  # its AND's share of its area
        both = has[:, None] & live[None, :]
        g_parent = tl.load(grad_or_ptr + parent[:, None] * rows + r[None, :], mask=both, other=0.0)  # (P, BLOCK)
        if MAXIMISE:
            slot = tl.load(parent_slot_ptr + first + jj, mask=has, other=0)[:, None]  # the AND's slot in its parent
            chosen = tl.load(choices_ptr + parent[:, None] * rows + r[None, :], mask=both, other=0).to(tl.int32)
            passed = tl.where(both & (chosen == slot + 1), g_parent * share, 0.0)
        else:
            children = tl.load(start_ptr + parent + 1, mask=has, other=1) - tl.load(start_ptr + parent, mask=has,
                                                                                     other=0)
            passed = tl.where(both, g_parent / (children + 1).to(tl.float32)[:, None] * share, 0.0)
        g = tl.sum(passed, axis=0) + tl.load(grad_root_ptr + r, mask=live & (node == root_id), other=0.0).to(
            tl.float32)
        tl.store(grad_or_ptr + node * rows + r, g, mask=live)
        count = tl.load(start_ptr + node + 1) - tl.load(start_ptr + node)
        if MAXIMISE:
            chosen_here = tl.load(choices_ptr + node * rows + r, mask=live, other=1).to(tl.int32)
            terminal = tl.where(chosen_here == 0, g, 0.0)
        else:
            terminal = g / (count + 1).to(tl.float32)
        tl.store(grad_term_ptr + node * rows + r, terminal, mask=live)


def _check_tables(tables: dict[str, Any]) -> None:
    """The kernels index the grammar's tables by pointer: a strided view would be read as garbage."""
    strided = [name for name, table in tables.items() if torch.is_tensor(table) and not table.is_contiguous()]
    if strided:
        raise ValueError(f"the AOG DP kernels need contiguous grammar tables; {strided} are not.")


def bottom_up(terminals: torch.Tensor, tables: dict[str, Any], root: int, maximise: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The DP forward on terminal scores (num_or, R) (any strides, float32/bf16/fp16): root scores (R,) in the
    input's dtype and every OR's choice (num_or, R) uint8, in OR-id order. `tables`: `AOGParsing.kernel_tables`."""
    _check_tables(tables)
    num_or, rows = terminals.shape
    scores = torch.empty(num_or, rows, dtype=torch.float32, device=terminals.device)
    choices = torch.empty(num_or, rows, dtype=torch.uint8, device=terminals.device)
    blocks = triton.cdiv(rows, BLOCK_ROWS)
    for first, end in tables["waves"]:  # children first: every wave reads only earlier waves
        _wave_up[(end - first, blocks)](
            terminals, terminals.stride(0), terminals.stride(1), scores, choices, tables["order"], tables["start"],
            tables["left"], tables["right"], tables["weight"], first, rows, MAXIMISE=maximise, BLOCK=BLOCK_ROWS,
            SLOTS=tables["slots"])
    return scores[root].to(terminals.dtype, copy=True), choices


def top_down(grad_root: torch.Tensor, choices: torch.Tensor, tables: dict[str, Any], root: int,
             maximise: bool) -> torch.Tensor:
    """The DP backward: the terminals' gradient (num_or, R) float32 in OR-id order from grad_root (R,) and the
    forward's choices (num_or, R)."""
    _check_tables(tables)
    num_or, rows = choices.shape
    grad_or = torch.empty(num_or, rows, dtype=torch.float32, device=choices.device)  # every OR written before read
    grad_terminals = torch.empty(num_or, rows, dtype=torch.float32, device=choices.device)
    blocks = triton.cdiv(rows, BLOCK_ROWS)
    for first, end in reversed(tables["waves"]):  # parents first: every wave reads only later waves
        _wave_down[(end - first, blocks)](
            grad_root.contiguous(), choices, grad_or, grad_terminals, tables["order"], tables["start"],
            tables["parent_start"], tables["parent_or"], tables["parent_slot"], tables["parent_share"], first, rows,
            root, MAXIMISE=maximise, BLOCK=BLOCK_ROWS, PARENTS=tables["parents"])
    return grad_terminals
