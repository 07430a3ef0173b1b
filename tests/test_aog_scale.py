"""The AOG head's pooling scale is the feature map's height over the batch's tallest image, as torchvision's
MultiScaleRoIAlign infers it: it was the map's width over the largest side, which put a batch of portrait images
(width / height < 0.71, a VOC 333x500 photo alone) at half its scale, so their boxes were pooled from the wrong cells
(a planted dog found at 0.05 alone, 0.99 beside a landscape image; val map_50 0.0 on portraits)."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.aog_rcnn.model import infer_scale


def test_a_portrait_batch_is_pooled_at_the_backbones_scale() -> None:
    feature = torch.zeros(1, 4, 12, 8)  # a stride-8 map of one 96x56 image, padded to 96x64
    assert infer_scale(feature, [(96, 56)]) == 0.125
    assert infer_scale(torch.zeros(1, 4, 8, 12), [(56, 96)]) == 0.125  # landscape, as before
    assert infer_scale(torch.zeros(2, 4, 12, 12), [(96, 56), (56, 96)]) == 0.125
    assert infer_scale(torch.zeros(1, 4, 96, 56), [(96, 56)]) == 1.0  # a map at the image's own resolution


@pytest.mark.parametrize("name", ["aog_rcnn_tinycnn", "vote_rcnn_tinycnn"])
def test_a_portrait_images_boxes_pool_alike_alone_and_beside_a_landscape_one(name: str) -> None:
    """The same boxes of one portrait image pool the same head inputs whether it is batched alone (padded to 96x64)
    or beside a landscape image (padded to 96x96): the padding only adds zeros to the right of it."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=3, image_size=96).eval()
    portrait, landscape = torch.rand(3, 96, 56), torch.rand(3, 56, 96)
    boxes = torch.tensor([[4.0, 8.0, 40.0, 60.0], [10.0, 30.0, 50.0, 90.0]])  # (K, 4) x1 y1 x2 y2, inside the image
    pooled = []
    with torch.no_grad():
        for batch in ([portrait], [portrait, landscape]):
            images, _ = model.transform(batch)
            assert images.image_sizes[0] == (96, 56)  # not resized: the boxes are in its pixels
            features = model.backbone(images.tensors)
            proposals = [boxes] + [boxes[:0]] * (len(batch) - 1)
            pooled.append(model.roi_heads.box_roi_pool(features, proposals, images.image_sizes))
    for key in ("terminal_scores", "box_regression"):
        torch.testing.assert_close(pooled[0][key], pooled[1][key], atol=1e-5, rtol=1e-4)
