"""DetectionAP's map_50 matches detections as VOC's devkit does (each detection gets its single best object; a
duplicate on an object already found is a false positive even if it overlaps a free neighbour well), checked
against a plain-Python transcription of the devkit's matching loop (voc_eval.py) with the same 101-point
interpolation."""

from __future__ import annotations

import random

import pytest
import torch

from zoo.aog_rcnn.metrics import DetectionAP

Box = list[float]


def iou(a: Box, b: Box) -> float:
    """Continuous IoU of two xyxy boxes (torchvision's, without the devkit's extra pixel)."""
    width = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    height = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_ap(tp: list[float], fp: list[float], positives: int) -> float:
    """pycocotools' 101-point interpolated AP of cumulated hits and misses in score order."""
    hits, misses, recall, precision = 0.0, 0.0, [], []
    for t, f in zip(tp, fp):
        hits, misses = hits + t, misses + f
        recall.append(hits / positives)
        precision.append(hits / max(hits + misses, 1e-12))
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    total = 0.0
    for level in (i / 100 for i in range(101)):
        index = next((i for i, r in enumerate(recall) if r >= level), None)  # searchsorted, side="left"
        total += precision[index] if index is not None else 0.0
    return total / 101


def reference_map_50(detections: list[list[tuple[Box, float, int]]],
                     objects: list[list[tuple[Box, int, bool]]]) -> float:
    """voc_eval.py per class, transcribed: detections over all images in descending score; each one's best
    same-class object (difficult ones included); IoU >= 0.5 (VOCevaldet.m): difficult -> neither tp nor fp, not yet
    detected -> tp, else fp; below -> fp. Mean AP over classes with a non-difficult object; -1 when none."""
    classes = sorted({label for image in objects for _, label, difficult in image if not difficult})
    aps = []
    for cls in classes:
        records = [{"bbox": [box for box, label, _ in image if label == cls],
                    "difficult": [difficult for _, label, difficult in image if label == cls]} for image in objects]
        for record in records:
            record["det"] = [False] * len(record["bbox"])
        positives = sum(not d for record in records for d in record["difficult"])
        found = [(image, box, score) for image, dets in enumerate(detections) for box, score, label in dets
                 if label == cls]
        found.sort(key=lambda item: -item[2])  # stable
        tp, fp = [0.0] * len(found), [0.0] * len(found)
        for d, (image, box, _) in enumerate(found):
            record = records[image]
            overlaps = [iou(box, gt) for gt in record["bbox"]]
            ovmax = max(overlaps) if overlaps else float("-inf")
            if ovmax >= 0.5:
                jmax = overlaps.index(ovmax)
                if not record["difficult"][jmax]:
                    if not record["det"][jmax]:
                        tp[d] = 1.0
                        record["det"][jmax] = True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        aps.append(reference_ap(tp, fp, positives))
    return sum(aps) / len(aps) if aps else -1.0


def metric_map_50(detections: list[list[tuple[Box, float, int]]], objects: list[list[tuple[Box, int, bool]]]
                  ) -> dict[str, float]:
    metric = DetectionAP()
    preds = [{"boxes": torch.tensor([b for b, _, _ in image], dtype=torch.float32).reshape(-1, 4),
              "scores": torch.tensor([s for _, s, _ in image], dtype=torch.float32),
              "labels": torch.tensor([c for _, _, c in image], dtype=torch.long)} for image in detections]
    targets = [{"boxes": torch.tensor([b for b, _, _ in image], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([c for _, c, _ in image], dtype=torch.long),
                "difficult": torch.tensor([d for _, _, d in image], dtype=torch.bool)} for image in objects]
    metric.update(preds, targets)
    return {k: v.item() for k, v in metric.compute().items()}


def test_a_duplicate_of_a_found_object_is_a_false_positive_even_over_a_free_neighbour() -> None:
    """Objects A and B overlap (IoU 0.54). The second detection's best object is A (IoU 0.82), already found by the
    first: the devkit counts it a false positive; COCO's matching (torchmetrics, used before) gave it B (IoU 0.67)
    and scored mAP@0.5 1.0. Devkit: TP, FP, TP -> 0.835 (101-point interpolation)."""
    detections = [[([0.0, 0, 10, 10], 0.9, 0), ([1.0, 0, 11, 10], 0.8, 0), ([3.0, 0, 13, 10], 0.1, 0)]]
    objects = [[([0.0, 0, 10, 10], 0, False), ([3.0, 0, 13, 10], 0, False)]]
    expected = reference_map_50(detections, objects)
    assert expected == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)  # precision 1 to recall 0.5, then 2/3
    result = metric_map_50(detections, objects)
    assert result["map_50"] == pytest.approx(expected, abs=1e-6)
    assert set(result) == {"map_50", "map"}


def random_case(rng: random.Random) -> tuple[list[list[tuple[Box, float, int]]], list[list[tuple[Box, int, bool]]]]:
    """Up to 4 images, 2 classes, difficult flags; detections jittered from objects (hits, duplicates, neighbours,
    wrong classes) or anywhere, on a coarse grid so that IoUs near 0.5 are common."""
    detections, objects = [], []
    for _ in range(rng.randint(1, 4)):
        image_objects = []
        for _ in range(rng.randint(0, 4)):
            x, y, w, h = rng.randint(0, 6) * 2, rng.randint(0, 6) * 2, rng.randint(3, 6) * 2, rng.randint(3, 6) * 2
            image_objects.append(([float(x), y, x + w, y + h], rng.randint(0, 1), rng.random() < 0.3))
        image_detections = []
        for _ in range(rng.randint(0, 6)):
            if image_objects and rng.random() < 0.7:
                box, label, _ = rng.choice(image_objects)
                box = [c + rng.randint(-2, 2) for c in box]
                box = [box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)]
                label = label if rng.random() < 0.85 else 1 - label
            else:
                x, y = rng.randint(0, 14), rng.randint(0, 14)
                box, label = [float(x), y, x + rng.randint(2, 10), y + rng.randint(2, 10)], rng.randint(0, 1)
            image_detections.append((box, rng.random(), label))
        detections.append(image_detections)
        objects.append(image_objects)
    return detections, objects


@pytest.mark.parametrize("seed", range(50))
def test_map_50_equals_the_devkit_transcription_on_random_cases(seed: int) -> None:
    detections, objects = random_case(random.Random(seed))
    assert metric_map_50(detections, objects)["map_50"] == pytest.approx(reference_map_50(detections, objects),
                                                                         abs=1e-6)


def test_map_50_reads_states_synced_into_one_tensor_each() -> None:
    """After a DDP sync the VOC states are one concatenated tensor each (dist_reduce_fx="cat"), not lists: the same
    number comes out."""
    detections, objects = random_case(random.Random(7))
    metric = DetectionAP()
    expected = metric_map_50(detections, objects)["map_50"]
    preds = [{"boxes": torch.tensor([b for b, _, _ in image]).reshape(-1, 4),
              "scores": torch.tensor([s for _, s, _ in image]), "labels": torch.tensor([c for _, _, c in image])}
             for image in detections]
    targets = [{"boxes": torch.tensor([b for b, _, _ in image]).reshape(-1, 4),
                "labels": torch.tensor([c for _, c, _ in image], dtype=torch.long),
                "difficult": torch.tensor([d for _, _, d in image], dtype=torch.bool)} for image in objects]
    metric.update(preds, targets)
    for name in ("voc_scores", "voc_labels", "voc_true_positive", "voc_object_labels"):
        setattr(metric, name, torch.cat(getattr(metric, name)))
    assert metric.voc_map_50().item() == pytest.approx(expected, abs=1e-6)
