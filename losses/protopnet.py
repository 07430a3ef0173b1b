"""ProtoPNet's losses (Chen et al., NeurIPS 2019): cross-entropy, the cluster and separation costs on the prototype
distances, and the L1 penalty on the last layer's wrong-class connections, each its own term so that stages pick
them (warm-up and joint: task + cluster + separation; last layer: task + L1)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import check_weight


def cluster_and_separation(min_distances: torch.Tensor, prototype_class: torch.Tensor, labels: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clst: mean over images of the smallest distance to a prototype of the image's class; Sep: the same to the
    other classes' prototypes. min_distances (B, P), prototype_class (P,), labels (B,)."""
    own = labels[:, None] == prototype_class[None, :]  # (B, P)
    inf = torch.finfo(min_distances.dtype).max
    cluster = min_distances.masked_fill(~own, inf).amin(1)  # (B,)
    separation = min_distances.masked_fill(own, inf).amin(1)  # (B,)
    return cluster.mean(), separation.mean()


class ProtoPNetLoss(nn.Module):
    """``{"loss_task", "loss_cluster", "loss_separation", "loss_l1"}``: CE, cluster * Clst, separation * Sep (the
    paper's -0.08: Sep is pushed up) and l1 * sum |w_wrong| (the last layer's weights from prototypes to the
    classes that do not own them). A model without prototypes (the linear-head twins) gets zeros for the three
    prototype terms, so one config trains both.

    Args:
        cluster: lambda_clst (the paper: 0.8); separation: lambda_sep (the paper: -0.08); l1: lambda_L1 (1e-4).
        target_key: the batch field of the labels.
    """

    def __init__(self, cluster: float = 0.8, separation: float = -0.08, l1: float = 1e-4,
                 target_key: str = "label") -> None:
        super().__init__()
        check_weight("ProtoPNetLoss", "cluster", cluster, "the cluster cost Clst")
        check_weight("ProtoPNetLoss", "separation", separation, "the separation cost Sep", sign=-1)
        check_weight("ProtoPNetLoss", "l1", l1, "the L1 norm of the last layer's wrong-class weights")
        self.cluster, self.separation, self.l1, self.target_key = cluster, separation, l1, target_key

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, labels = out["logits"], batch[self.target_key]
        terms = {"loss_task": F.cross_entropy(logits.float(), labels)}
        if "min_distances" not in out:  # a linear-head twin
            zero = logits.new_zeros((), dtype=torch.float32)
            return terms | {"loss_cluster": zero, "loss_separation": zero, "loss_l1": zero}
        cluster, separation = cluster_and_separation(out["min_distances"].float(), out["prototype_class"], labels)
        weight = out["last_layer_weight"]  # (C, P)
        wrong = torch.arange(weight.shape[0], device=weight.device)[:, None] != out["prototype_class"][None, :]
        return terms | {"loss_cluster": self.cluster * cluster, "loss_separation": self.separation * separation,
                        "loss_l1": self.l1 * (weight.float().abs() * wrong).sum()}
