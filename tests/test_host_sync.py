"""No host-device synchronisation inside any family's training step (issue: interpretability at the price of its
opaque twin on a GPU).

Each family's System is built from its config as `train.py fit` builds it, and one training step (the System's
`training_step`, backward and optimiser step; `benchmarks.op_counts`) runs under `torch.profiler` on the CPU. No
`aten::_local_scalar_dense` (what `.item()`, `float(t)`, `bool(t)`, `if t:` run) and no `aten::nonzero` (a shape read
from the data) may run in our code. Not counted, because they are no synchronisation on a GPU either: the optimiser's
step counters (host tensors), `aten::_assert_async` (torch.multinomial's device-side check, asynchronous on CUDA) and
`zoo/checks.py` (input checks that run only on CPU tensors; `test_input_checks_skip_device_tensors`).
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


def test_balanced_assignment_is_the_one_host_solve_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """ICNN's balanced category assignment is an optimal assignment solved by scipy on the host after each training
    forward (the step's loss uses it, so moving it would change the numbers): the only host work of that step, one
    solve per interpretable layer. Its device-to-host copy is invisible to a CPU profile; this counts the solves."""
    import zoo.icnn.model

    calls = []
    solver = zoo.icnn.model.linear_sum_assignment
    monkeypatch.setattr(zoo.icnn.model, "linear_sum_assignment", lambda cost: calls.append(cost.shape) or solver(cost))
    system, batch = build("icnn_balanced", batch_size=4)
    training_step(system, batch)()
    assert len(calls) == len(system.model.interpretable_layers())


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
