"""The AOG DP as two Triton kernels: the whole bottom-up pass in one launch, the whole top-down gradient in another.

`AOGParsing`'s PyTorch DP runs a few kernels per wave of rectangles (H + W - 1 waves), forward and backward: on a
GPU, with 512 RoIs x 21 classes of rows, that is a hundred-odd launches of tiny kernels (7x7 grid). Here every row
(RoI x class) is independent, so one program walks a block of rows through every OR node in the schedule's order,
children before parents, all of an OR's AND children at once (a (slots, rows) block), with a block barrier after
each node: its score is read back by other lanes of the program, never by another program (so no atomics, and the
gradient is deterministic).

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
    def _bottom_up(term_ptr, stride_node, stride_row, scores_ptr, choices_ptr, root_ptr,
                   order_ptr, start_ptr, left_ptr, right_ptr, weight_ptr,
                   rows, num_or, root_id, MAXIMISE: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
        """Scores (num_or, rows) float32 and choices (num_or, rows) uint8 of every OR, in OR-id order; the root's
        scores to root_ptr (rows,). An OR's candidates: its terminal (choice 0), then its AND children
        w * left + (1 - w) * right (choice j for the j-th), as torch.lerp computes them, all SLOTS (a power of two
        >= the most AND children of an OR) at once; the first maximum wins, and NaN wins as in torch.max."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        j = tl.arange(0, SLOTS)
        for i in range(num_or):
            node = tl.load(order_ptr + i).to(tl.int64)
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
            tl.debug_barrier()  # the children of later ORs are read by other lanes
        tl.store(root_ptr + r, tl.load(scores_ptr + root_id * rows + r, mask=live, other=0.0), mask=live)

    @triton.jit
    def _top_down(grad_root_ptr, choices_ptr, grad_or_ptr, grad_term_ptr,
                  order_ptr, start_ptr, left_ptr, right_ptr, weight_ptr,
                  rows, num_or, root_id, MAXIMISE: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
        """d(root)/d(terminals) times grad_root, (num_or, rows) float32 to grad_term_ptr; grad_or_ptr is a zeroed
        (num_or, rows) float32 scratch table. Parents before children: an OR passes its gradient to its chosen
        child (max) or shares it equally (mean); an AND passes it to its children in proportion to their areas."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = r < rows
        j = tl.arange(0, SLOTS)
        tl.store(grad_or_ptr + root_id * rows + r, tl.load(grad_root_ptr + r, mask=live, other=0.0).to(tl.float32),
                 mask=live)
        tl.debug_barrier()
        for i in range(num_or):
            node = tl.load(order_ptr + num_or - 1 - i).to(tl.int64)  # the schedule backwards
            g = tl.load(grad_or_ptr + node * rows + r, mask=live, other=0.0)
            first = tl.load(start_ptr + node)
            end = tl.load(start_ptr + node + 1)
            if MAXIMISE:
                chosen = tl.load(choices_ptr + node * rows + r, mask=live, other=0).to(tl.int32)
                tl.store(grad_term_ptr + node * rows + r, tl.where(chosen == 0, g, 0.0), mask=live)
                split = live & (chosen > 0)
                s = first + chosen - 1  # each row's chosen AND slot
                w = tl.load(weight_ptr + s, mask=split, other=0.0)
                at = grad_or_ptr + tl.load(left_ptr + s, mask=split, other=0).to(tl.int64) * rows + r
                tl.store(at, tl.load(at, mask=split, other=0.0) + g * w, mask=split)
                at = grad_or_ptr + tl.load(right_ptr + s, mask=split, other=0).to(tl.int64) * rows + r
                tl.store(at, tl.load(at, mask=split, other=0.0) + g * (1.0 - w), mask=split)
            else:
                count = end - first
                share = g / (count + 1).to(tl.float32)
                tl.store(grad_term_ptr + node * rows + r, share, mask=live)
                has = j < count  # every AND child takes the share, split by area; the 2 x count children differ
                slot = first + j
                w = tl.load(weight_ptr + slot, mask=has, other=0.0)[:, None]
                both = has[:, None] & live[None, :]
                child = tl.load(left_ptr + slot, mask=has, other=0).to(tl.int64)[:, None]  # (SLOTS, 1)
                at = grad_or_ptr + child * rows + r[None, :]
                tl.store(at, tl.load(at, mask=both, other=0.0) + share[None, :] * w, mask=both)
                child = tl.load(right_ptr + slot, mask=has, other=0).to(tl.int64)[:, None]
                at = grad_or_ptr + child * rows + r[None, :]
                tl.store(at, tl.load(at, mask=both, other=0.0) + share[None, :] * (1.0 - w), mask=both)
            tl.debug_barrier()


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
    out = torch.empty(rows, dtype=torch.float32, device=terminals.device)
    _bottom_up[(triton.cdiv(rows, BLOCK_ROWS),)](
        terminals, terminals.stride(0), terminals.stride(1), scores, choices, out, tables["order"],
        tables["start"], tables["left"], tables["right"], tables["weight"], rows, num_or, root,
        MAXIMISE=maximise, BLOCK=BLOCK_ROWS, SLOTS=tables["slots"])
    return out.to(terminals.dtype), choices


def top_down(grad_root: torch.Tensor, choices: torch.Tensor, tables: dict[str, Any], root: int,
             maximise: bool) -> torch.Tensor:
    """The DP backward: the terminals' gradient (num_or, R) float32 in OR-id order from grad_root (R,) and the
    forward's choices (num_or, R)."""
    _check_tables(tables)
    num_or, rows = choices.shape
    grad_or = torch.zeros(num_or, rows, dtype=torch.float32, device=choices.device)
    grad_terminals = torch.empty(num_or, rows, dtype=torch.float32, device=choices.device)
    _top_down[(triton.cdiv(rows, BLOCK_ROWS),)](
        grad_root.contiguous(), choices, grad_or, grad_terminals, tables["order"], tables["start"], tables["left"],
        tables["right"], tables["weight"], rows, num_or, root, MAXIMISE=maximise, BLOCK=BLOCK_ROWS,
        SLOTS=tables["slots"])
    return grad_terminals
