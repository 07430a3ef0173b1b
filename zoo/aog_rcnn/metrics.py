"""The detector's metrics (DDP-safe): mAP (the two numbers the family reports: mAP@0.5 with detections matched as
VOC's devkit matches them, mAP@[.5:.95] torchmetrics' COCO MeanAveragePrecision; VOC's difficult objects left out
the devkit's way) and whether a detection's parse tree finds the object's parts: parse-part IoU against true part
boxes.

For every ground-truth object, the detection that explains it is the highest-scoring one of the same class with
box IoU >= `match_iou`. Its partition (the parse tree's leaves, a uniform grid of cells, or the box itself) is
compared with the object's true part boxes both ways, because a partition always covers the whole box:
- part recall: for each true part, the best IoU with any leaf, averaged over parts (favours fine partitions);
- leaf precision: for each leaf, the best IoU with any true part, averaged over leaves (favours leaves that are
  parts, penalises empty cells);
- part_iou: their mean, the headline number (logged as parse_part_iou, grid_part_iou, box_part_iou).
Objects without a matching detection are counted as missed (reported as `matched`), not scored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a (N, P, 4) with b (N, L, 4), per row: (N, P, L)."""
    top_left = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    bottom_right = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def partition_scores(iou: torch.Tensor, leaf_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Part recall and leaf precision of M partitions per object: iou (G, P, L) of true parts with every leaf box,
    leaf_mask (G, M, L) bool (the leaves each partition uses) -> recall, precision (G, M). In float32 (float64
    stays) with autocast off: validation runs under the trainer's autocast, which would sum the leaves in bf16."""
    iou = iou.to(torch.promote_types(iou.dtype, torch.float32))
    with torch.autocast(iou.device.type, enabled=False):
        recall = (iou[:, :, None, :] * leaf_mask[:, None]).amax(-1).mean(1)  # (G, M): best used leaf per part
        mask = leaf_mask.to(iou.dtype)
        precision = (mask @ iou.amax(1)[..., None])[..., 0] / mask.sum(-1)  # (G, M): best part per used leaf
    return recall, precision


def match_detections(pred_boxes: torch.Tensor, pred_scores: torch.Tensor, pred_labels: torch.Tensor,
                     true_boxes: torch.Tensor, true_labels: torch.Tensor, match_iou: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true object the index of its best same-class detection with IoU >= match_iou: (G,), and (G,) bool
    saying whether there is one."""
    if len(pred_boxes) == 0 or len(true_boxes) == 0:
        return torch.zeros(len(true_boxes), dtype=torch.long), torch.zeros(len(true_boxes), dtype=torch.bool)
    valid = (box_iou(true_boxes, pred_boxes) >= match_iou) & (true_labels[:, None] == pred_labels[None])  # (G, D)
    ranked = torch.where(valid, pred_scores[None].float(), torch.tensor(-1.0))
    return ranked.argmax(1), valid.any(1)


class ParsePartIoU(Metric):
    """update(preds, targets): preds per image {"boxes", "scores", "labels", "leaf_boxes" (D, L, 4), "leaf_mask"
    (D, L) bool}; targets per image {"boxes", "labels", "part_boxes" (G, P, 4)}. compute() -> dict of
    part_iou, part_recall, leaf_precision, leaves (mean leaves per matched detection) and matched (fraction of
    objects with a matching detection). Nothing to score is no score: the first four are NaN when no object was
    matched (0 would read as parses that miss every part), matched is NaN when there was no object."""

    higher_is_better = True
    # leaves is a count: neither better nor worse (reports give it no direction)
    entry_directions: ClassVar[dict[str, bool | None]] = {"leaves": None}
    full_state_update = False

    def __init__(self, match_iou: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.match_iou = match_iou
        for name in ("recall_sum", "precision_sum", "leaves_sum", "matched", "objects"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        for pred, target in zip(preds, targets):  # images hold different numbers of objects
            parts = target["part_boxes"]
            detection, found = match_detections(pred["boxes"], pred["scores"], pred["labels"], target["boxes"],
                                                target["labels"], self.match_iou)
            self.objects += len(parts)
            if not found.any():
                continue
            leaves = pred["leaf_boxes"][detection[found]]  # (G', L, 4)
            mask = pred["leaf_mask"][detection[found]]  # (G', L)
            dtype = torch.promote_types(leaves.dtype, torch.float32)  # boxes overlap in float32 (float64 stays)
            iou = pairwise_iou(parts[found].to(dtype), leaves.to(dtype))  # (G', P, L)
            recall, precision = (score[:, 0] for score in partition_scores(iou, mask[:, None]))  # (G',) each
            self.recall_sum += recall.sum().double()
            self.precision_sum += precision.sum().double()
            self.leaves_sum += mask.sum().double()
            self.matched += found.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.full_like(self.matched, float("nan"))

        def mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:  # NaN over nothing, no host sync
            return torch.where(count > 0, total / count.clamp(min=1), nan)

        recall, precision = mean(self.recall_sum, self.matched), mean(self.precision_sum, self.matched)
        return {"part_iou": ((recall + precision) / 2).float(), "part_recall": recall.float(),
                "leaf_precision": precision.float(), "leaves": mean(self.leaves_sum, self.matched).float(),
                "matched": mean(self.matched, self.objects).float()}


def drop_difficult(detection: dict[str, torch.Tensor], target: dict[str, torch.Tensor], iou_threshold: float = 0.5
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One image's detections and targets as VOC's devkit scores them: difficult objects are neither found nor
    missed. Their boxes leave the targets, and so does every detection whose best same-class overlap (IoU, over all
    objects, difficult ones included) is a difficult object's and above `iou_threshold`; any other detection is
    scored as usual (a detection inside a difficult box that overlaps it little is a false positive, as in the
    devkit, where COCO's crowd regions would excuse it)."""
    difficult = target["difficult"].bool()
    boxes, labels = detection["boxes"], detection["labels"]
    if len(boxes) and difficult.any():
        iou = box_iou(boxes, target["boxes"].to(boxes.dtype))  # (D, G)
        iou = torch.where(labels[:, None] == target["labels"][None], iou, torch.full_like(iou, -1.0))
        best, which = iou.max(1)  # (D,)
        keep = ~(difficult[which] & (best > iou_threshold))
        detection = {k: v[keep] for k, v in detection.items()}
    return detection, {k: target[k][~difficult] for k in ("boxes", "labels")}


def voc_matches(detection: dict[str, torch.Tensor], target: dict[str, torch.Tensor], iou_threshold: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's detections matched as VOC's devkit matches them (VOCevaldet.m, voc_eval.py): each detection gets
    its single best-overlapping object of its class (IoU over all of them, difficult ones included). IoU >=
    `iou_threshold` with a difficult object: ignored (neither hit nor miss); with another object: a true positive if
    no higher-scoring detection took that object, else a false positive; lower IoU: a false positive. COCO's rule
    (used by torchmetrics) would instead give a detection the best object not yet taken, turning a duplicate into a
    hit on a neighbour. Returns the kept detections' scores (D',), labels (D',) and true-positive flags (D',) long,
    in descending score order (stable), as the devkit ranks them."""
    boxes, scores, labels = detection["boxes"], detection["scores"], detection["labels"]
    difficult = target["difficult"].bool() if "difficult" in target else torch.zeros_like(target["labels"]).bool()
    order = torch.argsort(scores, descending=True, stable=True)  # (D,)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    if len(target["boxes"]) == 0 or len(boxes) == 0:
        return scores, labels, torch.zeros_like(labels)
    iou = box_iou(boxes, target["boxes"].to(boxes.dtype))  # (D, G)
    iou = torch.where(labels[:, None] == target["labels"][None], iou, torch.full_like(iou, -1.0))
    best, which = iou.max(1)  # (D,): best same-class object of each detection
    hit = best >= iou_threshold
    ignored = hit & difficult[which]
    candidate = hit & ~difficult[which]  # (D,) would take object `which`
    rank = torch.arange(len(boxes), device=boxes.device)  # (D,) detections are in score order already
    first = torch.full((len(difficult),), len(boxes), dtype=torch.long, device=boxes.device)  # (G,)
    first = first.scatter_reduce(0, which[candidate], rank[candidate], reduce="amin")  # first taker of each object
    true_positive = (candidate & (rank == first[which])).long()  # (D,)
    keep = ~ignored
    return scores[keep], labels[keep], true_positive[keep]


def interpolated_ap(true_positive: torch.Tensor, positives: int, points: int = 101) -> torch.Tensor:
    """Average precision of a class's detections, true_positive (D,) in descending score order over `positives`
    objects, with COCO's (torchmetrics') interpolation: precision made non-increasing in recall, read at `points`
    recall levels 0, 0.01, ..., 1 (the first detection reaching each level; 0 past the last recall). float64."""
    hits = true_positive.double().cumsum(0)  # (D,)
    misses = (1 - true_positive.double()).cumsum(0)
    recall = hits / positives
    precision = hits / (hits + misses).clamp(min=1)
    precision = precision.flip(0).cummax(0).values.flip(0)  # (D,) best precision at this recall or beyond
    levels = torch.linspace(0, 1, points, dtype=torch.float64, device=recall.device)  # (R,)
    index = torch.searchsorted(recall, levels, side="left")  # (R,)
    reached = index < len(recall)
    read = precision[index.clamp(max=max(len(recall) - 1, 0))] if len(recall) else torch.zeros_like(levels)
    return torch.where(reached, read, torch.zeros_like(levels)).mean()


class DetectionAP(MeanAveragePrecision):
    """Mean average precision of xyxy boxes; compute() -> {"map_50": VOC's mAP@0.5 (the checkpoint monitor),
    "map": torchmetrics' COCO mAP@[.5:.95]}. Both interpolate precision at 101 recall points (COCO's way).

    update(detections, targets) takes the detector's outputs and the batch's targets as they are: per image
    {"boxes" (D, 4), "scores" (D,), "labels" (D,), ...} and {"boxes" (G, 4), "labels" (G,), "difficult" (G,)
    optional, "index" () optional: the image's dataset index, ...}; other keys are ignored.

    `map_50` is VOC's measure but for the interpolation (VOC2007's devkit: 11 points; VOC2010 on: every point): its
    detections are matched as the devkit matches them (`voc_matches`: each detection's single best object, difficult
    ones ignored, duplicates false positives), ranked by score over all images per class, and averaged over the
    classes that have a non-difficult object (-1 when none has, as torchmetrics). Detections of equal score are
    ranked in the order of their images in the dataset (by the targets' "index", pycocotools' order of image ids)
    when every image has one, so `map_50` is the same on any number of processes (a DDP gather puts rank 0's
    images first; ties are common: softmax scores saturate to 1.0 in float32, and bf16 keeps 128 values per
    octave); without indices, in the order the images came. Unlike torchmetrics it keeps every detection of an
    image (the devkit has no 100-per-image cap) and uses continuous IoU (the devkit adds a pixel to widths and
    heights) with IoU >= 0.5 a hit (VOCevaldet.m; voc_eval.py's > differs only at exactly 0.5).
    `map` stays torchmetrics' COCO evaluation (COCO matching: a detection takes the best object not yet taken), on
    detections and objects with the difficult ones left out the devkit's way (`drop_difficult`).

    Under DDP every rank pads its per-image states with empty images up to the largest rank's count before
    torchmetrics' gather (`_sync_dist`), which issues one collective per list entry of torchmetrics' states (the
    VOC states, concatenated, one each): an evaluation sampler that repeats no sample gives ranks different numbers
    of images (13 on 2 ranks: 7 and 6), and mismatched collectives crashed or hung. An image with neither
    detections nor objects changes neither AP."""

    higher_is_better = True
    full_state_update = True
    # torchmetrics' per-image list states (dist_reduce_fx=None) kept for iou_type="bbox": the masks stay empty.
    # Name -> (dtype when a rank holds no image to copy it from, shape of an empty image's entry).
    _IMAGE_STATES: ClassVar[dict[str, tuple[torch.dtype | None, tuple[int, ...]]]] = {
        "detection_box": (None, (0, 4)), "detection_scores": (None, (0,)), "detection_labels": (torch.long, (0,)),
        "groundtruth_box": (None, (0, 4)), "groundtruth_labels": (torch.long, (0,)),
        "groundtruth_crowds": (torch.long, (0,)), "groundtruth_area": (torch.long, (0,)),
        # this class's VOC states (concatenated on sync): per image the kept detections' scores, labels,
        # true-positive flags and image's dataset index (-1: unknown), and the non-difficult objects' labels
        "voc_scores": (None, (0,)), "voc_labels": (torch.long, (0,)), "voc_true_positive": (torch.long, (0,)),
        "voc_image_index": (torch.long, (0,)), "voc_object_labels": (torch.long, (0,))}
    _VOC_STATES: ClassVar[tuple[str, ...]] = ("voc_scores", "voc_labels", "voc_true_positive", "voc_image_index",
                                              "voc_object_labels")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(box_format="xyxy", iou_type="bbox", **kwargs)
        for name in self._VOC_STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, detections: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        pairs = [({k: d[k] for k in ("boxes", "scores", "labels")}, t) for d, t in zip(detections, targets)]
        for detection, target in pairs:  # images hold different numbers of objects
            scores, labels, true_positive = voc_matches(detection, target)
            self.voc_scores.append(scores)
            self.voc_labels.append(labels)
            self.voc_true_positive.append(true_positive)
            index = target.get("index")  # () the image's dataset index; -1 when the dataset gives none
            index = index.long().reshape(()) if index is not None else torch.tensor(-1, device=labels.device)
            self.voc_image_index.append(index.to(labels.device).expand(len(labels)))  # (D',), no host sync
            difficult = target["difficult"].bool() if "difficult" in target else None
            self.voc_object_labels.append(target["labels"] if difficult is None else target["labels"][~difficult])
        pairs = [drop_difficult(d, t) if "difficult" in t else (d, {k: t[k] for k in ("boxes", "labels")})
                 for d, t in pairs]  # images hold different numbers of objects
        super().update([d for d, _ in pairs], [t for _, t in pairs])

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        """Pad every rank's per-image states to the same number of images (one all-reduce of the counts), then
        torchmetrics' gather. New lists, so the local ones come back unchanged on `unsync` (cached before the
        sync). Runs only under DDP; one process never syncs."""
        images = len(self.detection_labels)
        count = torch.tensor(images, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=process_group or self.process_group)
        missing = int(count) - images
        if missing > 0:
            for name, (dtype, shape) in self._IMAGE_STATES.items():
                entries = getattr(self, name)
                dtype = entries[0].dtype if entries else dtype or self.dtype  # as the other ranks' entries
                empty = torch.zeros(shape, dtype=dtype, device=self.device)  # (0, 4) boxes, (0,) the others
                setattr(self, name, [*entries, *[empty] * missing])
        super()._sync_dist(dist_sync_fn=dist_sync_fn, process_group=process_group)

    def voc_map_50(self) -> torch.Tensor:
        """VOC's mAP@0.5 of the matches `update` kept: per class with a non-difficult object, its detections over
        all images in descending score (stable: on ties in the order of their images in the dataset when every
        image came with its "index", as pycocotools orders image ids, else in the order the images came; within an
        image in `voc_matches`' order), `interpolated_ap`; their mean, -1 when no class has an object. A loop over
        classes, at compute time only."""
        # a list before a DDP sync, one tensor after it (dist_reduce_fx="cat")
        scores, labels, true_positive, image, objects = (
            torch.cat(state) if isinstance(state, list) and state else state if isinstance(state, torch.Tensor)
            else torch.zeros(0, dtype=torch.long, device=self.device)
            for state in (getattr(self, name) for name in self._VOC_STATES))
        if len(image) and bool((image >= 0).all()):  # (D,) the dataset's order, whatever order the ranks gathered
            by_image = torch.argsort(image, stable=True)  # stable: an image's detections keep their order
            scores, labels, true_positive = scores[by_image], labels[by_image], true_positive[by_image]
        classes, positives = objects.long().unique(return_counts=True)  # (C,) each
        if len(classes) == 0:
            return torch.tensor(-1.0, device=self.device)
        aps = []
        for label, count in zip(classes.tolist(), positives.tolist()):
            mine = labels.long() == label
            order = torch.argsort(scores[mine], descending=True, stable=True)
            aps.append(interpolated_ap(true_positive[mine][order], count))
        return torch.stack(aps).mean().float()

    def compute(self) -> dict[str, torch.Tensor]:
        results = super().compute()
        return {"map_50": self.voc_map_50().to(results["map"].device), "map": results["map"]}
