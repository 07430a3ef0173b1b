"""No host-device synchronisation inside any family's training step (issue: interpretability at the price of its
opaque twin on a GPU).

Each family's System is built from its config as `train.py fit` builds it, and one training step (the System's
`training_step`, backward and optimiser step; `benchmarks.op_counts`) runs under `torch.profiler` on the CPU. No
`aten::_local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)`, `if t:` run) and no op whose output shape is read
from the data (`aten::nonzero`, `torch.unique`, `torch.masked_select`) may run in our code. Not counted, because
they are no synchronisation on a GPU either: the optimiser's step counters (host tensors), `aten::_assert_async`
(torch.multinomial's device-side check, asynchronous on CUDA) and `zoo/checks.py` (input checks that run only on CPU
tensors; `test_input_checks_skip_device_tensors`).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.op_counts import FAMILIES, build, profile_step, sync_sites, training_step

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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_training_step_reads_no_device_value(family: str) -> None:
    torch.manual_seed(0)
    system, batch = build(family, batch_size=4)
    sites = sync_sites(profile_step(training_step(system, batch), warmup=1))
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["icnn", "icnn_balanced"])
def test_an_icnn_step_on_a_gpu_makes_no_implicit_synchronisation(family: str) -> None:
    """On a GPU, `torch.cuda.set_sync_debug_mode("error")` raises at any implicit host-device synchronisation
    (`.item()`, a copy to pageable host memory, a data-dependent shape). The balanced solve's wait for the previous
    step's copy is an explicit event wait, which it allows."""
    system, batch = build(family, batch_size=4)
    system.cuda()
    batch = {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}
    step = training_step(system, batch)
    step()  # warm-up: caches (the part-mask table, the template prior) are built once per device
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_profile_names_each_kind_of_synchronisation_and_where_it_runs() -> None:
    """The detector the tests above rely on: a value read, a nonzero, a unique and a masked_select in a step are
    each found, with their Python call site; the same step without them is clean."""
    x = torch.rand(16)

    def syncing_step() -> None:
        float(x.sum())
        x.nonzero()
        torch.unique((x * 4).long())
        x.masked_select(x > 0.5)

    sites = sync_sites(profile_step(syncing_step, warmup=0))["ours"]
    kinds = {site.split(" in ")[0] for site in sites}
    assert kinds == {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::masked_select"}, sites
    assert any(site.startswith("aten::nonzero in tests/test_host_sync.py(") for site in sites), sites
    assert sync_sites(profile_step(lambda: x.sum() * 2, warmup=0))["ours"] == []


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
