"""Location instability and part IoU against slow references and hand-built maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.icnn.metrics import LocationInstability, PartIoU


def reference_instability(maps: np.ndarray, landmarks: np.ndarray, visible: np.ndarray, image: int,
                          top_n: int) -> float:
    batch, filters, h, w = maps.shape
    values = []
    for f in range(filters):
        peaks = [maps[b, f].max() for b in range(batch)]
        top = sorted(range(batch), key=lambda b: -peaks[b])[:top_n]
        for k in range(landmarks.shape[1]):
            distances = []
            for b in top:
                i, j = np.unravel_index(maps[b, f].argmax(), (h, w))
                centre = ((j + 0.5) * image / w, (i + 0.5) * image / h)
                if visible[b, k]:
                    distances.append(math.dist(centre, landmarks[b, k]))
            if len(distances) >= 2:
                values.append(np.std(distances, ddof=1) / math.hypot(image, image))
    return float(np.mean(values))


def test_location_instability_matches_reference_across_batches() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((10, 3, 4, 4)).astype(np.float32)
    landmarks = rng.random((10, 2, 2)).astype(np.float32) * 16
    visible = rng.random((10, 2)) > 0.2
    metric = LocationInstability(image_size=16, top_n=4)
    for part in (slice(0, 3), slice(3, 7), slice(7, 10)):  # top-N must be global, not per batch
        metric.update(torch.tensor(maps[part]), torch.tensor(landmarks[part]), torch.tensor(visible[part]))
    expected = reference_instability(maps, landmarks, visible, 16, 4)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)


def test_a_filter_locked_to_a_landmark_is_perfectly_stable() -> None:
    landmarks = torch.tensor([[[2.0, 6.0]], [[10.0, 14.0]], [[6.0, 2.0]]])  # one landmark per image, unit centres
    maps = torch.zeros(3, 2, 4, 4)
    for b, (x, y) in enumerate(landmarks[:, 0].tolist()):
        maps[b, 0, int(y // 4), int(x // 4)] = 1.0 + b  # filter 0 fires on the landmark
        maps[b, 1, 0, 0] = 1.0 + b  # filter 1 fires at a fixed corner: unstable relative to the landmark
    metric = LocationInstability(image_size=16)
    metric.update(maps, landmarks)
    per_filter = metric.per_filter()
    assert per_filter[0, 0] == 0 and per_filter[1, 0] > 0.1


def reference_part_scores(maps: torch.Tensor, masks: np.ndarray, types: np.ndarray, quantile: float,
                          threshold: float, num_parts: int) -> np.ndarray:
    up = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False).numpy()
    scores = np.zeros((maps.shape[1], num_parts))
    for f in range(maps.shape[1]):
        values = np.sort(up[:, f].ravel())[::-1]
        t_f = values[max(1, int(quantile * values.size))]  # the top int(q * size) values lie strictly above
        for k in range(num_parts):
            with_part = [n for n in range(len(masks)) if k in types[n]]
            hits = 0
            for n in with_part:
                active = up[n, f] > t_f
                for p in np.flatnonzero(types[n] == k):
                    union = (active | masks[n, p]).sum()
                    hits += union > 0 and (active & masks[n, p]).sum() / union > threshold
            scores[f, k] = hits / max(1, len(with_part))
    return scores


def test_part_iou_matches_reference() -> None:
    rng = np.random.default_rng(1)
    maps = torch.tensor(rng.random((6, 4, 4, 4)), dtype=torch.float32)
    masks = rng.random((6, 2, 8, 8)) > 0.6
    types = rng.integers(0, 3, (6, 2))
    metric = PartIoU(num_parts=3, quantile=0.2, iou_threshold=0.1, filter_chunk=3)
    metric.update(maps[:4], torch.tensor(masks[:4]), torch.tensor(types[:4]))
    metric.update(maps[4:], torch.tensor(masks[4:]), torch.tensor(types[4:]))
    expected = reference_part_scores(maps, masks, types, 0.2, 0.1, 3)
    assert np.allclose(metric.part_scores().numpy(), expected)
    assert metric.compute().item() == pytest.approx(expected.max(1).mean())


def test_a_filter_that_is_the_part_mask_scores_one() -> None:
    masks = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    for n in range(4):
        masks[n, 0, n:n + 2, 2:4] = True  # 4 pixels per image, 16 of 256 in all
    maps = masks.float()  # same resolution: no interpolation blur
    metric = PartIoU(quantile=16 / 256)
    metric.update(maps, masks)
    assert metric.compute().item() == 1.0
    with pytest.raises(ValueError, match=r"Expected maps \(B, F, h, w\) and part_masks"):
        metric.update(maps[:, 0], masks)


def test_with_labels_top_images_come_from_the_filters_category() -> None:
    """Filter 0 fires at a fixed place relative to class-0 landmarks and strongly but erratically on class 1
    images; per category only its class-0 images count (class 0 has the higher mean peak)."""
    rng = np.random.default_rng(2)
    maps = torch.zeros(8, 1, 4, 4)
    landmarks = torch.zeros(8, 1, 2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for b in range(8):
        i, j = rng.integers(0, 4, 2)
        landmarks[b, 0] = torch.tensor([(j + 0.5) * 4, (i + 0.5) * 4])
        if b < 4:
            maps[b, 0, i, j] = 10.0  # on the landmark
        else:
            maps[b, 0, rng.integers(0, 4), rng.integers(0, 4)] = 3.0
    metric = LocationInstability(image_size=16, top_n=4)
    metric.update(maps, landmarks, labels=labels)
    assert metric.compute().item() == 0.0
    without_labels = LocationInstability(image_size=16, top_n=6)
    without_labels.update(maps, landmarks)
    assert without_labels.compute().item() > 0.0
