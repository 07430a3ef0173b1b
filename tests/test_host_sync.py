"""No host-device synchronisation inside any family's training step (issue: interpretability at the price of its
opaque twin on a GPU).

Each family's System is built from its config as `train.py fit` builds it, and one training step (the System's
`training_step`, backward and optimiser step; `benchmarks.op_counts`) runs under `torch.profiler` on the CPU. No
`aten::_local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)`, `if t:` run) and no op whose output shape is read
from the data (`aten::nonzero`, `torch.unique`, `torch.masked_select`) may run in our code. Not counted, because
they are no synchronisation on a GPU either: the optimiser's step counters (host tensors), `aten::_assert_async`
(torch.multinomial's device-side check, asynchronous on CUDA) and `zoo/checks.py` (input checks that run only on CPU
tensors; `test_input_checks_skip_device_tensors`).

On a GPU (skipped without one), the same step of every family runs under `torch.cuda.set_sync_debug_mode`, which
also sees what a CPU profile cannot: copies between the host's pageable memory and the device.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable

import pytest
import torch

from benchmarks.op_counts import FAMILIES, build, has_call_sites, profile_step, sync_sites, training_step

# AOG R-CNN is a torchvision detector: these are torchvision's own data-dependent shapes, by design, in
#   models/detection/_utils.py      Matcher and BalancedPositiveNegativeSampler (torch.where on matches, index_put)
#   models/detection/rpn.py         assign_targets_to_anchors, filter_proposals, compute_loss
#   models/detection/roi_heads.py   assign_targets_to_proposals, subsample, fastrcnn_loss
#   models/detection/transform.py   resize (torch_choice reads the chosen size)
#   models/detection/generalized_rcnn.py  forward's degenerate-box check
#   ops/boxes.py                    remove_small_boxes
# Only those files may synchronise; every op of ours (grammar DP, PS RoI align, AOG losses) must not.
TORCHVISION_SITES = ("torchvision/models/detection/_utils.py", "torchvision/models/detection/rpn.py",
                     "torchvision/models/detection/roi_heads.py", "torchvision/models/detection/transform.py",
                     "torchvision/models/detection/generalized_rcnn.py", "torchvision/ops/boxes.py")


def require_call_sites(profile: torch.profiler.profile) -> None:
    """The CPU check needs the profiler to say which Python line called each op. Where it does not (seen once: torch
    2.11 on a GPU machine, every call site "?"), the test cannot tell our ops from the optimiser's and is skipped;
    there the GPU test below checks the step."""
    if not has_call_sites(profile):
        pytest.skip(f"torch {torch.__version__}'s profiler tied no op to its Python call site here")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_training_step_reads_no_device_value(family: str) -> None:
    torch.manual_seed(0)
    system, batch = build(family, batch_size=4)
    profile = profile_step(training_step(system, batch), warmup=2)  # 2: ICNN solves the previous step's assignment
    require_call_sites(profile)
    sites = sync_sites(profile)
    assert sites["ours"] == [], f"{family}: host-device synchronisations in the training step: {sites['ours']}"
    if family == "aog_rcnn":
        assert sites["torchvision"], "the detector's RPN no longer syncs: drop the exception above"
        assert all(any(site in where for site in TORCHVISION_SITES) for where in sites["torchvision"]), \
            sites["torchvision"]
    else:
        assert sites["torchvision"] == []


def test_balanced_assignment_is_solved_before_the_next_forward_not_inside_its_own_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ICNN's balanced category assignment is an optimal assignment solved by scipy on the host. A step queues its
    statistics (a non-blocking copy on a GPU) and the next step solves them before its forward, one solve per
    interpretable layer: no step after the first waits for the device between its own forward and its loss. The
    copy is invisible to a CPU profile; this checks the order of the solves and the forwards."""
    import zoo.icnn.model

    order: list[str] = []
    solver = zoo.icnn.model.linear_sum_assignment
    monkeypatch.setattr(zoo.icnn.model, "linear_sum_assignment", lambda cost: order.append("solve") or solver(cost))
    system, batch = build("icnn_balanced", batch_size=4)
    system.model.backbone.register_forward_pre_hook(lambda *_: order.append("forward"))
    step = training_step(system, batch)
    layers = len(system.model.interpretable_layers())
    step()
    assert order == ["forward"] + ["solve"] * layers  # the first step alone solves its own statistics
    order.clear()
    step()
    assert order == ["forward"]  # nothing queued before it; its own statistics are queued for the next step
    for _ in range(3):
        order.clear()
        step()
        assert order == ["solve"] * layers + ["forward"]  # the previous step's, then this step's forward


def synchronising_calls(step: Callable[[], None]) -> list[list[str]]:
    """The Python stack ("path(line)" frames, innermost last) of every implicit host-device synchronisation in one
    call of `step` on a GPU, as `torch.cuda.set_sync_debug_mode("warn")` reports them: `.item()`, a copy to or from
    pageable host memory (a CPU-built tensor copied in), a data-dependent shape. Explicit waits (an event's
    `synchronize`, as the balanced solve waits for the previous step's copy) are no implicit synchronisation."""
    stacks: list[list[str]] = []

    def record(message: Warning | str, *_: object, **__: object) -> None:
        if str(message).startswith("called a synchronizing CUDA operation"):  # not the mode's own notice
            stacks.append([f"{frame.filename}({frame.lineno})" for frame in traceback.extract_stack()[:-1]
                           if not frame.filename.endswith("warnings.py")])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()  # the mode is checked on the host as each op is called: no need to wait for the device
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return stacks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_training_step_on_a_gpu_makes_no_implicit_synchronisation(family: str) -> None:
    """Every family's training step on a GPU, as the Trainer runs it on a CUDA batch, under
    `torch.cuda.set_sync_debug_mode`: not one implicit synchronisation of ours, the copies the CPU profile cannot see
    included (the AOG detector's are torchvision's own, in the files named above)."""
    from pytorch_lightning.utilities import move_data_to_device

    torch.manual_seed(0)
    system, batch = build(family, batch_size=4)
    system.cuda()
    step = training_step(system, move_data_to_device(batch, torch.device("cuda")))
    step()  # warm-up: caches (ICNN's part-mask table and template prior) are built once per device
    step()
    stacks = [stack for _ in range(2) for stack in synchronising_calls(step)]
    ours = [stack[-6:] for stack in stacks if not any(site in frame for frame in stack for site in TORCHVISION_SITES)]
    assert ours == [], f"{family}: implicit host-device synchronisations in a GPU training step: {ours}"
    if family != "aog_rcnn":
        assert stacks == []


def test_the_profile_names_each_kind_of_synchronisation_and_where_it_runs() -> None:
    """The detector the tests above rely on: a value read, a nonzero, a unique and a masked_select in a step are
    each found, with their Python call site; the same step without them is clean."""
    x = torch.rand(16)

    def syncing_step() -> None:
        float(x.sum())
        x.nonzero()
        torch.unique((x * 4).long())
        x.masked_select(x > 0.5)

    profile = profile_step(syncing_step, warmup=0)
    require_call_sites(profile)
    sites = sync_sites(profile)["ours"]
    kinds = {site.split(" in ")[0] for site in sites}
    assert kinds == {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::masked_select"}, sites
    assert any(site.startswith("aten::nonzero in tests/test_host_sync.py(") for site in sites), sites
    assert sync_sites(profile_step(lambda: x.sum() * 2, warmup=0))["ours"] == []


def test_the_gpu_detector_records_where_each_synchronisation_was_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """The detector the GPU test relies on, without a GPU: each warning that sync-debug mode raises is kept with the
    stack that called it, other warnings (the mode's own notice too: on the GPU it was first counted as a
    synchronisation) are not, and the mode is reset afterwards."""
    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def syncing_op() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                      "synchronizing operations", UserWarning)  # the mode's own notice, once per process

    def step() -> None:
        syncing_op()
        syncing_op()

    stacks = synchronising_calls(step)
    assert modes == ["warn", "default"] and len(stacks) == 2
    assert all("test_host_sync.py" in stack[-1] and "test_host_sync.py" in stack[-2] for stack in stacks), stacks
    assert stacks[0][-1] == stacks[1][-1] and stacks[0][-2] != stacks[1][-2]  # the same op, called from two lines
    assert synchronising_calls(lambda: None) == []


def test_input_checks_skip_device_tensors() -> None:
    """Checks that read values (label and token ranges, NaN scans) run on CPU tensors only: on any other device
    (meta here, standing for a GPU) they read nothing."""
    from zoo.checks import batch_field, check_class_ids, ids_out_of_range

    labels = torch.empty(8, dtype=torch.long, device="meta")
    check_class_ids(labels, 3)
    assert ids_out_of_range(labels, 0, 2) is None
    assert ids_out_of_range(torch.tensor([0, 5]), 0, 2) == (0, 5)
    assert ids_out_of_range(torch.tensor([0, 2]), 0, 2) is None
    batch_field({"image": torch.empty(2, 3, device="meta")}, "image")
