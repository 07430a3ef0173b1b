"""ProtoPNet: the distance layer against a direct computation, the loss terms, push (distance 0 to its source,
the same under 2-process DDP), what each stage trains, the part metrics, the CLI (fit, compare with the twins)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import zoo
from losses.protopnet import ProtoPNetLoss
from tests.conftest import REPO
from zoo.protopnet.metrics import PartConsistency
from zoo.protopnet.model import EPSILON, ProtoPNet, squared_distances
from zoo.protopnet.push import apply_push, nearest_patches, push_loader
from zoo.protopnet.system import ProtoPNetSystem

NUM_CLASSES, PER_CLASS = 4, 3
CONFIG = str(REPO / "configs/protopnet/parts_world.yaml")
SMALL_WORLD = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32",
               "--data.init_args.num_classes=4"]
STAGES = [{"name": "warm_up", "epochs": 1, "train": ["add_on", "prototypes"],
           "losses": ["loss_task", "loss_cluster", "loss_separation"]},
          {"name": "last_layer", "epochs": 1, "train": ["last_layer"], "losses": ["loss_task", "loss_l1"]}]


def model(**kwargs) -> ProtoPNet:
    torch.manual_seed(0)
    return zoo.create_model("protopnet_tinycnn", num_classes=NUM_CLASSES, prototypes_per_class=PER_CLASS,
                            prototype_channels=16, **kwargs)


@pytest.mark.parametrize("name", ["protopnet_tinycnn", "protopnet_resnet18", "protopnet_timm"])
def test_registered_models_output_prototype_scores(name: str) -> None:
    net = zoo.create_model(name, num_classes=NUM_CLASSES, prototypes_per_class=PER_CLASS, in_chans=1)
    out = net(torch.rand(2, 1, 64, 64))
    assert out["logits"].shape == (2, NUM_CLASSES) and out["min_distances"].shape == (2, NUM_CLASSES * PER_CLASS)
    assert out["unit_maps"].shape[:2] == (2, NUM_CLASSES * PER_CLASS) and zoo.model_family(name) == "protopnet"
    assert torch.equal(out["prototype_class"], torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS))


def test_distances_similarities_and_logits_match_a_direct_computation() -> None:
    net = model().eval()
    images = torch.rand(3, 3, 64, 64)
    out = net(images)
    latent = out["latent"]  # (B, D, h, w)
    direct = (latent[:, None] - net.prototypes.vectors[None, :, :, None, None]).pow(2).sum(2)  # (B, P, h, w)
    torch.testing.assert_close(squared_distances(latent, net.prototypes.vectors), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["min_distances"], direct.flatten(2).amin(-1), atol=1e-5, rtol=1e-5)
    scores = torch.log((out["min_distances"] + 1) / (out["min_distances"] + EPSILON))  # max-pooled similarity
    torch.testing.assert_close(out["logits"], scores @ net.last_layer.weight.T)
    torch.testing.assert_close(out["unit_maps"].flatten(2).amax(-1), scores)
    own = F.one_hot(out["prototype_class"], NUM_CLASSES).T.bool()  # (C, P)
    assert (net.last_layer.weight[own] == 1).all() and (net.last_layer.weight[~own] == -0.5).all()


def test_loss_terms_match_hand_computed_values() -> None:
    min_distances = torch.tensor([[1.0, 2.0, 0.5, 3.0], [4.0, 0.25, 2.0, 1.5]])  # 2 classes x 2 prototypes
    owner = torch.tensor([0, 0, 1, 1])
    weight = torch.tensor([[1.0, 1.0, -0.5, 0.2], [-0.3, 0.0, 1.0, 1.0]])
    out = {"logits": torch.randn(2, 2), "min_distances": min_distances, "prototype_class": owner,
           "last_layer_weight": weight}
    terms = ProtoPNetLoss(cluster=0.8, separation=-0.08, l1=0.01)(out, {"label": torch.tensor([0, 1])})
    # image 0 (class 0): own min 1.0, other min 0.5; image 1 (class 1): own min 1.5, other min 0.25
    torch.testing.assert_close(terms["loss_cluster"], torch.tensor(0.8 * (1.0 + 1.5) / 2))
    torch.testing.assert_close(terms["loss_separation"], torch.tensor(-0.08 * (0.5 + 0.25) / 2))
    torch.testing.assert_close(terms["loss_l1"], torch.tensor(0.01 * (0.5 + 0.2 + 0.3 + 0.0)))
    twin = ProtoPNetLoss()({"logits": out["logits"]}, {"label": torch.tensor([0, 1])})
    assert twin["loss_cluster"] == twin["loss_separation"] == twin["loss_l1"] == 0


def small_train_set(num_images: int = 24) -> tuple[torch.utils.data.Dataset, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(num_images, 3, 64, 64, generator=generator)
    labels = torch.arange(num_images) % NUM_CLASSES
    return [{"image": image, "label": label} for image, label in zip(images, labels)], labels


def test_push_puts_every_prototype_on_a_training_patch_of_its_class_at_distance_zero() -> None:
    net = model().eval()
    dataset, labels = small_train_set()
    loader, indices = push_loader(dataset, 5, None, world_size=1, rank=0)  # batches of 5: the minimum runs on
    found = nearest_patches(net, loader, indices, "image", "label", torch.device("cpu"))
    moved = apply_push(net, found, (64, 64))
    layer = net.prototypes
    assert (moved > 0).all() and (layer.source_index >= 0).all()
    assert torch.equal(labels[layer.source_index], layer.prototype_class)  # a patch of its own class
    with torch.no_grad():
        sources = net.latent(torch.stack([dataset[i]["image"] for i in layer.source_index.tolist()]))
    row, column = layer.source_position.unbind(1)
    patch = sources[torch.arange(len(row)), :, row, column]  # (P, D)
    distance = (patch - layer.vectors).pow(2).sum(1)
    assert distance.max() < 1e-10  # pushed onto its source patch exactly
    with torch.no_grad():
        everything = net.latent(torch.stack([d["image"] for d in dataset]))
    all_distances = squared_distances(everything, layer.vectors)  # (N, P, h, w)
    own = labels[:, None] == layer.prototype_class[None]
    nearest = all_distances.masked_fill(~own[..., None, None], float("inf")).flatten(2).amin(-1).amin(0)
    assert nearest.max() < 1e-6  # and no patch of its class was nearer before (it is the nearest of the set)
    cell = 64 / everything.shape[-1]
    torch.testing.assert_close(layer.source_box, torch.stack([column * cell, row * cell, (column + 1) * cell,
                                                             (row + 1) * cell], 1).float())


@pytest.mark.parametrize("per_class", [PER_CLASS, 2])
def test_predictions_name_the_top_prototypes_of_the_predicted_class(per_class: int) -> None:
    """predictions.csv's `top_prototypes` column: for each image the predicted class's own prototypes of largest
    similarity x last-layer weight for it (at most 3: with 2 prototypes per class both, and no other class's
    prototype with its -0.5 connection fills the list), best first, as "p<id>:<class name>:<score>:<source index>"
    (the training image push took it from); the twins add nothing."""
    from zoo.protopnet.model import similarity

    names = ["ant", "bee", "cat", "dog"]
    torch.manual_seed(0)
    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, class_names=names,
                             model_kwargs={"prototypes_per_class": per_class, "prototype_channels": 16}).eval()
    dataset, _ = small_train_set()
    loader, indices = push_loader(dataset, 8, None, world_size=1, rank=0)
    apply_push(system.model, nearest_patches(system.model, loader, indices, "image", "label", torch.device("cpu")),
               (64, 64))
    batch = {"image": torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3)), "index": torch.arange(5)}
    with torch.no_grad():
        prediction = system.predict_step(batch, 0)
        out = system.model(batch["image"])
    layer, weight = system.model.prototypes, system.model.last_layer.weight  # (C, P)
    for row, cell in enumerate(prediction["columns"]["top_prototypes"]):
        entries = [entry.split(":") for entry in cell.split("; ")]
        ids = [int(entry[0].removeprefix("p")) for entry in entries]
        predicted = int(prediction["pred"][row])
        own = (layer.prototype_class == predicted).nonzero().flatten()  # (m,) the predicted class's prototypes
        evidence = similarity(out["min_distances"][row]) * weight[predicted]  # (P,)
        assert ids == prediction["top_prototypes"][row].tolist() and set(ids) <= set(own.tolist())
        # (two prototypes pushed onto one patch tie: compare the scores, not the order of tied ids)
        assert evidence[ids].tolist() == evidence[own].topk(min(3, per_class)).values.tolist()
        assert [entry[1] for entry in entries] == [names[predicted]] * min(3, per_class)
        assert [float(entry[2]) for entry in entries] == pytest.approx(evidence[ids].tolist(), rel=1e-3)
        assert min(float(entry[2]) for entry in entries) > 0  # own prototypes: evidence for the class
        assert [int(entry[3]) for entry in entries] == layer.source_index[ids].tolist()
        assert min(layer.source_index[ids].tolist()) >= 0
    twin = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, model_kwargs={"head": "linear"}).eval()
    with torch.no_grad():
        assert "columns" not in twin.predict_step(batch, 0)


def test_prototype_picture_shows_the_predicted_classs_own_prototypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`PrototypesCallback` ranks as predictions.csv (`top_class_prototypes`): with 2 prototypes per class and
    top_k 3, each row shows the predicted class's 2 prototypes, none of another class."""
    from types import SimpleNamespace

    from zoo.protopnet.callback import PrototypesCallback

    names = ["ant", "bee", "cat", "dog"]
    torch.manual_seed(0)
    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, class_names=names,
                             model_kwargs={"prototypes_per_class": 2, "prototype_channels": 16}).eval()
    callback = PrototypesCallback(num_images=4, top_k=3)
    callback.batch = {"image": torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)),
                      "label": torch.arange(4)}
    published = {}
    monkeypatch.setattr(callback, "publish", lambda trainer, tag, figure, markdown, name: published.update(
        markdown=markdown))
    with torch.no_grad():
        callback.draw(SimpleNamespace(datamodule=SimpleNamespace(class_names=names)), system, None)
        predicted = system.model(callback.batch["image"])["logits"].argmax(-1).tolist()
    rows = published["markdown"].splitlines()[2:]
    assert len(rows) == 4
    for row, predicted_class in zip(rows, predicted):
        listed = row.split(" | ")[3].split("<br>")
        assert len(listed) == 2 and all(f"({names[predicted_class]}, " in entry for entry in listed), row


def gradients(system: ProtoPNetSystem, batch: dict[str, torch.Tensor]) -> set[str]:
    """The model's children that get a non-zero gradient from a training step's selected terms."""
    system.model.zero_grad()
    terms = system.schedule.select(system.compute_loss(system.forward_batch(batch, "train"), batch, "train"))
    sum(terms.values()).backward()
    return {name for name, child in system.model.named_children()
            if any(p.grad is not None and p.grad.any() for p in child.parameters())}


def test_stages_train_what_the_paper_says() -> None:
    torch.manual_seed(0)
    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, stages=STAGES,
                             model_kwargs={"prototypes_per_class": PER_CLASS})
    batch = {"image": torch.rand(4, 3, 64, 64), "label": torch.arange(4)}
    expected = [{"add_on", "prototypes"}, {"last_layer"}]
    for index, trained in enumerate(expected):
        system.schedule.start_epoch(system.model, None, index)
        assert gradients(system, batch) == trained
        assert set(system.schedule.select(system.compute_loss(system.forward_batch(batch, "train"), batch,
                                                              "train"))) == set(STAGES[index]["losses"])


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="head must be one of"):
        model(head="pooled")
    with pytest.raises(ValueError, match="push_stages names"):
        ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, stages=STAGES, push_stages=["push"])
    with pytest.raises(ValueError, match="prototypes_per_class and prototype_channels must be >= 1"):
        zoo.create_model("protopnet_tinycnn", num_classes=NUM_CLASSES, prototypes_per_class=0)
    with pytest.raises(ValueError, match="stability_noise must be >= 0"):
        ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, stability_noise=-0.1)
    with pytest.raises(ValueError, match=r"Expected maps \(B, m, h, w\), units \(B, m\)"):
        PartConsistency(num_units=4).update(torch.rand(2, 3, 8, 8), torch.zeros(2, 2, dtype=torch.long),
                                            torch.zeros(2, 1, 8, 8, dtype=torch.bool), torch.zeros(2, 1))


def test_part_metrics_match_hand_computed_values() -> None:
    """Two 8x8 images, one part each (type 5 on the left half of image 0, type 7 on the right half of image 1), two
    units: unit 0 fires on the left on both images, unit 1 left then right. Huang et al.'s consistency counts a part
    over the images where it is present: unit 0 touches type 5 on the one image that has it (type 7's image: it
    touches nothing), unit 1 touches type 5 and type 7 wherever they are: both consistent. Purity (one part type the
    most overlapped on 80 % of all the images) scores neither."""
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :, :4] = True  # image 0: part type 5 on the left half
    masks[1, 0, :, 4:] = True  # image 1: part type 7 on the right half
    types = torch.tensor([[5], [7]])
    left, right = torch.zeros(8, 8), torch.zeros(8, 8)
    left[:, :4], right[:, 4:] = 1.0, 1.0
    maps = torch.stack([torch.stack([left, left]), torch.stack([left, right])])  # (B=2, m=2, 8, 8)
    units = torch.tensor([[0, 1], [0, 1]])
    noisy = torch.stack([torch.stack([left, right]), torch.stack([left, right])])  # unit 0 moves on image 0
    metric = PartConsistency(num_units=2, num_part_types=8, quantile=0.5, threshold=0.8)
    metric.update(maps[:1], units[:1], masks[:1], types[:1], noisy[:1])  # two updates: states add up
    metric.update(maps[1:], units[1:], masks[1:], types[1:], noisy[1:])
    scores = metric.compute()
    # touched / present: unit 0: type 5 1/1, type 7 0/1; unit 1: type 5 1/1, type 7 1/1
    assert scores["consistency"] == 1.0
    assert metric.touched[:, [5, 7]].tolist() == [[1, 0], [1, 1]] and metric.present[:, [5, 7]].tolist() == [[1, 1]] * 2
    # purity: unit 0: type 5, then background (no overlap): top share 1/2; unit 1: type 5, then type 7: top share 1/2
    assert scores["purity"] == 0.0
    # IoU: unit 0: 1 (left = part), 0; unit 1: 1, 1 -> mean over units of (0.5, 1.0)
    assert scores["iou"] == pytest.approx(0.75)
    # stable: unit 0 image 0 left -> right ({5} -> {}): no; image 1 left -> left: yes; unit 1: both yes
    assert scores["stability"] == pytest.approx((0.5 + 1.0) / 2)
    single = PartConsistency(num_units=2, num_part_types=8, quantile=0.5)
    single.update(maps[:1], units[:1], masks[:1], types[:1])
    assert single.compute()["consistency"] == 1.0  # one image each: both units touch type 5 every time


def two_part_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` 8x8 images with part type 1 on the left half and type 2 on the right half: masks (count, 2, 8, 8),
    types (count, 2)."""
    masks = torch.zeros(count, 2, 8, 8, dtype=torch.bool)
    masks[:, 0, :, :4], masks[:, 1, :, 4:] = True, True
    return masks, torch.tensor([[1, 2]]).expand(count, 2)


def test_part_consistency_is_huangs_any_part_touched_rule() -> None:
    """Huang et al. (CVPR 2023, `evaluate_consistency`): every part the region touches counts, per part over the
    images where it is present, consistent when any part reaches 0.8. A region covering both parts on every image
    with its boundary moving (most overlap on part 1 on 5 images, on part 2 on the others) is consistent (the zoo's
    earlier one-part rule scored it 0: a 5 / 5 split); one on part 1 on 7 images and part 2 on 3 is not (0.7, 0.3)."""
    count = 10
    masks, types = two_part_images(count)
    straddle = torch.zeros(count, 1, 8, 8)
    for image in range(count):  # 3 columns on one side of the boundary, 1 on the other, the side alternating
        low, high = (1, 5) if image % 2 else (3, 7)
        straddle[image, 0, :, low:high] = 1.0
    units = torch.zeros(count, 1, dtype=torch.long)
    metric = PartConsistency(num_units=1, num_part_types=4, quantile=0.5)
    metric.update(straddle, units, masks, types)
    scores = metric.compute()
    assert scores["consistency"] == 1.0 and scores["purity"] == 0.0
    assert metric.touched[0, 1:3].tolist() == [count, count] and metric.hits[0, 1:3].tolist() == [5, 5]
    split = torch.zeros(count, 1, 8, 8)
    split[:7, 0, :, :4], split[7:, 0, :, 4:] = 1.0, 1.0  # part 1 on 7 images, part 2 on 3: each present in all 10
    metric = PartConsistency(num_units=1, num_part_types=4, quantile=0.5)
    metric.update(split, units, masks, types)
    assert metric.compute()["consistency"] == 0.0
    # a part absent from some images counts over the images where it is present: part 1 absent from the 3 images
    # where the region lies on part 2, so touched on 7 of 7 (not 7 of the class's 10): consistent
    masks[7:, 0] = False
    metric = PartConsistency(num_units=1, num_part_types=4, quantile=0.5)
    metric.update(split, units, masks, types)
    assert metric.compute()["consistency"] == 1.0
    assert metric.touched[0, 1].item() == 7 and metric.present[0, 1].item() == 7


@pytest.mark.parametrize("head", ["prototypes", "linear"])
def test_add_on_layers_start_as_the_authors_code(head: str) -> None:
    """cfchen-duke/ProtoPNet `_initialize_weights`: the add-on convs Kaiming-normal, fan-out, ReLU gain (std
    sqrt(2 / fan_out)), zero biases; the twin's add-on layers alike. PyTorch's default (uniform, fan-in, a = sqrt(5))
    gives std 1 / sqrt(3 fan_in) and non-zero biases."""
    torch.manual_seed(0)
    net = zoo.create_model("protopnet_tinycnn", num_classes=NUM_CLASSES, prototype_channels=256, head=head,
                           add_on=True)
    convs = [layer for layer in net.add_on if isinstance(layer, torch.nn.Conv2d)]
    assert len(convs) == 2
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert (conv.bias == 0).all()
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
        assert abs(conv.weight.mean().item()) < 0.01


def test_add_on_init_pytorch_keeps_pytorchs_default_and_other_names_are_refused() -> None:
    """`add_on_init="pytorch"` (the parts-world config's: the authors' init learns too slowly at its budget) leaves
    PyTorch's default: uniform fan-in, std 1 / sqrt(3 fan_in), non-zero biases."""
    torch.manual_seed(0)
    net = zoo.create_model("protopnet_tinycnn", num_classes=NUM_CLASSES, prototype_channels=256, add_on_init="pytorch")
    for conv in [layer for layer in net.add_on if isinstance(layer, torch.nn.Conv2d)]:
        assert conv.weight.std().item() == pytest.approx((3 * conv.in_channels) ** -0.5, rel=0.05)
        assert (conv.bias != 0).all()
    with pytest.raises(ValueError, match="add_on_init must be one of"):
        zoo.create_model("protopnet_tinycnn", num_classes=NUM_CLASSES, add_on_init="xavier")


def test_stability_noise_is_huangs_clipped_gaussian(monkeypatch: pytest.MonkeyPatch) -> None:
    """Huang et al.'s `perturb_img`: N(0, 0.2) noise clipped to +-0.25, added to the images the model takes."""
    system = ProtoPNetSystem(model_name="protopnet_tinycnn", num_classes=2, image_size=64,
                             model_kwargs={"prototypes_per_class": 1, "prototype_channels": 8}).eval()
    seen = []
    forward = system.model.forward
    monkeypatch.setattr(system.model, "forward", lambda images: seen.append(images) or forward(images))
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    masks[:, :, 8:16, 8:16] = True
    batch = {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1]), "part_masks": masks,
             "part_types": torch.ones(2, 1, dtype=torch.long), "index": torch.tensor([3, 4])}
    with torch.no_grad():
        system.update_metrics(system.forward_batch(batch, "val"), batch, "val")
    noise = seen[-1] - batch["image"]  # (B, C, H, W)
    assert noise.abs().max().item() == pytest.approx(0.25) and (noise.abs() > 0.2499).float().mean() > 0.15
    assert noise.std().item() == pytest.approx(0.163, abs=0.005)  # N(0, 0.2) clipped at 1.25 sigma: std 0.163
    assert (system.stability_noise, system.stability_noise_clip) == (0.2, 0.25)
    with pytest.raises(ValueError, match="stability_noise_clip must be > 0"):
        ProtoPNetSystem("protopnet_tinycnn", num_classes=2, stability_noise_clip=0)


def test_part_stability_compares_the_touched_part_vectors() -> None:
    """Huang et al.'s `evaluate_stability`: an image is stable when the set of parts its region touches is the same
    with noise. A region on part 1 that grows over part 2 under noise keeps part 1 as the part it overlaps most (the
    zoo's earlier rule: stable) but touches another part: unstable."""
    masks, types = two_part_images(2)
    clean, noisy = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    clean[:, 0, :, :4] = 1.0  # both images: on part 1 only
    noisy[0, 0, :, :4] = 1.0  # image 0 unchanged
    noisy[1, 0, :, 1:5] = 1.0  # image 1: mostly part 1, and one column of part 2
    metric = PartConsistency(num_units=1, num_part_types=4, quantile=0.5)
    metric.update(clean, torch.zeros(2, 1, dtype=torch.long), masks, types, noisy)
    assert metric.compute()["stability"] == 0.5


def test_own_explanation_is_the_evidence_for_the_class_upsampled() -> None:
    """ProtoPNet's own map (spec, "Explanations") is its prototypes' similarity maps weighted by their positive
    connections to the class: under the paper's initial last layer (+1 own, -0.5 others) the own prototypes' maps,
    non-zero and peaking where they are most similar. The whole row summed was negative everywhere (the wrong-class
    prototypes outweigh the own ones on similarities with a large constant part) and clipped to an all-zero map.
    A twin keeps its class activation map: the whole row, negative evidence clipped."""
    net = model().eval()
    images, target = torch.rand(2, 3, 64, 64), torch.tensor([1, 3])
    with torch.no_grad():
        explained = zoo.explain(net, images, "own", target=target)
        out = net(images)
    assert net.last_layer.weight.unique().tolist() == [-0.5, 1.0]
    own = out["unit_maps"].view(2, NUM_CLASSES, PER_CLASS, 8, 8)[torch.arange(2), target].sum(1)  # (B, 8, 8)
    expected = F.interpolate(own[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert explained.shape == (2, 64, 64) and (explained.flatten(1).amax(1) > 0).all()
    torch.testing.assert_close(explained, expected)
    peak = explained.flatten(1).argmax(1)  # (B,) pixel index: in the cell where the own prototypes are most similar
    assert torch.equal((peak // 64 // 8) * 8 + peak % 64 // 8, own.flatten(1).argmax(1))
    twin = model(head="linear").eval()
    with torch.no_grad():
        cam = torch.einsum("bu,buhw->bhw", twin.last_layer.weight[target], twin(images)["unit_maps"])  # (B, 8, 8)
        expected = F.interpolate(cam[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(zoo.explain(twin, images, "own", target=target), expected.relu())


def test_cells_sit_at_their_receptive_field_centres_on_a_resnet() -> None:
    """On a resnet (padded strided convolutions) a cell's receptive-field centre lies half a cell from the even spread
    the authors' resize gives: the own explanation, the part metrics' activated regions and push's source box all put
    the cells there (`Backbone.map_geometry`), as ICNN's part metrics and the CAM do."""
    from zoo.backbones import cells_to_pixels, model_map_geometry
    from zoo.protopnet.metrics import activated_regions

    torch.manual_seed(0)
    net = zoo.create_model("protopnet_resnet18", num_classes=2, prototypes_per_class=1, prototype_channels=8).eval()
    images, target = torch.rand(2, 3, 64, 64), torch.tensor([0, 1])
    geometry = model_map_geometry(net, (64, 64))  # stride 32, offset 0.5: cell 1's centre at pixel 32.5, not 48
    assert geometry.stride == (32.0, 32.0) and geometry.offset[0] < 16
    with torch.no_grad():
        explained = zoo.explain(net, images, "own", target=target)
        evidence = net.class_map(net(images), target)  # (B, 2, 2)
    torch.testing.assert_close(explained, cells_to_pixels(evidence, (64, 64), geometry).relu())
    even = F.interpolate(evidence[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].relu()
    assert not torch.allclose(explained, even)
    # the middle cell of a 96-px image's 3 x 3 map lit: its region is centred on its receptive-field centre (pixel
    # 32.5 on both axes, not the even spread's 48), and the metric scores a part there that the even spread misses
    wide = model_map_geometry(net, (96, 96))
    maps = torch.zeros(1, 1, 3, 3)
    maps[0, 0, 1, 1] = 1.0
    region = activated_regions(maps, (96, 96), 0.95, wide).view(96, 96)
    rows, columns = region.nonzero().float().add(0.5).unbind(1)
    assert abs(rows.mean() - wide.centres(torch.tensor(1.0), 0)) < 1 and abs(columns.mean() - 32.5) < 1.5
    masks = torch.zeros(1, 1, 96, 96, dtype=torch.bool)
    masks[0, 0, 22:43, 22:43] = True
    scored = {}
    for name, where in (("centres", wide), ("even", None)):
        metric = PartConsistency(num_units=1, num_part_types=2, quantile=0.95)
        metric.update(maps, torch.zeros(1, 1, dtype=torch.long), masks, torch.tensor([[1]]), None, where)
        scored[name] = float(metric.compute()["iou"])
    assert scored["centres"] > 0.5 > scored["even"]
    # push: the source box is one cell's size centred on the receptive-field centre, clipped to the image
    found = {"distance": torch.zeros(2), "vector": torch.zeros(2, 8), "source_index": torch.tensor([0, 1]),
             "source_position": torch.tensor([[1, 1], [0, 1]]), "size": torch.tensor([2, 2])}
    apply_push(net, found, (64, 64), geometry)
    centre = torch.tensor(geometry.offset) + torch.tensor([[1, 1], [0, 1]]) * 32  # (2, 2) y, x
    low, high = (centre - 16).clamp(min=0), (centre + 16).clamp(max=64)
    torch.testing.assert_close(net.prototypes.source_box, torch.stack([low[:, 1], low[:, 0], high[:, 1], high[:, 0]],
                                                                      1))


def test_the_system_scores_parts_with_the_backbones_geometry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The System hands the part metric its backbone's measured geometry (in the masks' pixels)."""
    from zoo.backbones import model_map_geometry

    seen = []
    update = PartConsistency.update
    monkeypatch.setattr(PartConsistency, "update", lambda self, *args: seen.append(args[-1]) or update(self, *args))
    system = ProtoPNetSystem(model_name="protopnet_resnet18", num_classes=2, image_size=64,
                             model_kwargs={"prototypes_per_class": 1, "prototype_channels": 8}).eval()
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    masks[:, :, 8:16, 8:16] = True
    batch = {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1]), "part_masks": masks,
             "part_types": torch.ones(2, 1, dtype=torch.long)}
    with torch.no_grad():
        system.update_metrics(system.forward_batch(batch, "val"), batch, "val")
    assert seen and seen[-1] == model_map_geometry(system.model, (64, 64)).resized((64, 64), (32, 32))


@pytest.mark.parametrize("head", ["prototypes", "linear"])
def test_a_bf16_model_explains_and_scores_in_its_weights_dtype(head: str) -> None:
    """A model whose weights are bf16 (`model.bfloat16()`, Lightning's "bf16-true") runs its add-on layers in bf16
    (not float32, which its bf16 weights refuse), so it predicts and its own map explains it."""
    net = model(head=head).bfloat16().eval()
    images = torch.rand(2, 3, 64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = net(images)
    assert out["latent"].dtype == torch.bfloat16 and torch.isfinite(out["logits"].float()).all()
    assert zoo.explain(net, images, "own", target=torch.tensor([0, 1])).shape == (2, 64, 64)


def test_twin_scores_its_top_weighted_channels() -> None:
    twin = model(head="linear", add_on=False)
    with torch.no_grad():
        twin.last_layer.weight.copy_(torch.arange(NUM_CLASSES * 128).view(NUM_CLASSES, 128).float() % 128)
    assert torch.equal(twin.class_units(), torch.tensor([[127, 126, 125]]).expand(NUM_CLASSES, 3))
    assert twin(torch.rand(2, 3, 64, 64))["unit_maps"].shape == (2, 128, 8, 8)  # the backbone's top map


def test_fit_pushes_logs_part_metrics_and_draws_prototypes(in_tmp_dir: Path) -> None:
    from train import main

    cli = main(["fit", "--config", CONFIG, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
                "--model.init_args.push_stages=[warm_up]", *SMALL_WORLD])  # a run folder: fast_dev_run writes none
    assert cli.trainer.state.finished
    metrics = cli.trainer.callback_metrics
    assert {"train/loss_cluster", "push/distance", "val/part_consistency", "val/part_iou",
            "val/part_stability"} <= set(metrics)
    assert metrics["push/pushed"] == 1.0 and (cli.model.model.prototypes.source_index >= 0).all()
    run = Path(cli.trainer.log_dir)
    assert (run / "prototypes" / "epoch0.png").is_file()
    assert "train #" in (run / "prototypes" / "epoch0.md").read_text()


def test_compare_trains_protopnet_against_the_linear_head_twins(in_tmp_dir: Path) -> None:
    from train import main

    rows = main(["compare", "--config", CONFIG, "--trainer.fast_dev_run=true", "--explain_images=2", *SMALL_WORLD])
    assert [row["run"] for row in rows] == ["protopnet", "linear_head", "add_on_linear_head"]
    for row in rows:
        assert {"acc", "part_consistency", "part_iou", "part_stability"} <= set(row)
    explained = (in_tmp_dir / "checkpoints" / "protopnet_parts_world_compare" / "explanations.csv").read_text()
    methods = [line.split(",")[1] for line in explained.splitlines() if line.startswith("protopnet,")]
    assert methods == ["cam", "saliency", "integrated_gradients", "occlusion", "random"]  # "cam": its own prototype map


def test_bf16_training_step_is_finite() -> None:
    torch.manual_seed(0)
    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, model_kwargs={"prototypes_per_class": 2})
    batch = {"image": torch.rand(4, 3, 64, 64), "label": torch.arange(4)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = system.compute_loss(system.forward_batch(batch, "train"), batch, "train")
    assert all(torch.isfinite(t) and t.dtype == torch.float32 for t in terms.values())


@pytest.mark.parametrize("head", ["prototypes", "linear"])
def test_add_on_layers_run_in_float32_under_bf16_autocast(head: str) -> None:
    """Push (float32) puts a prototype on a latent patch; under bf16 autocast the Sigmoid's bf16 output put it about
    4e-5 away from its own patch (median squared distance). The add-on layers run in float32 on the backbone's
    (bf16) top map: z is float32, the float32 add-on of those features, and a prototype on one of its patches is at
    distance 0 (the twin with add-on layers gets the same float32 z)."""
    net = model(head=head, add_on=True).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = net.forward_features(images)  # bf16: the backbone runs under autocast
            out = net(images)
        expected = net.add_on(features.float())  # (B, D, h, w) in float32, autocast off
        assert features.dtype == torch.bfloat16 and out["latent"].dtype == torch.float32
        torch.testing.assert_close(out["latent"], expected, rtol=0, atol=0)
        if head == "prototypes":
            net.prototypes.vectors[1] = expected[0, :, 2, 3]  # pushed onto image 0, cell (2, 3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                distance = net(images)["min_distances"][0, 1]
            assert distance.dtype == torch.float32 and distance.item() < 1e-6


class SavePrototypes(pl.Callback):
    """Each rank writes its prototypes and their sources at its first training batch (after the epoch's push)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            layer = pl_module.model.prototypes
            torch.save({"vectors": layer.vectors.detach().clone(), "source_index": layer.source_index.clone(),
                        "source_position": layer.source_position.clone()},
                       self.folder / f"rank{trainer.global_rank}.pt")


def test_two_process_ddp_push_equals_the_single_process_push(tmp_path: Path) -> None:
    """Under 2-process DDP each process pushes over half of the training set; the all-gathered minima give both
    processes the prototypes and sources of one process pushing over all of it."""
    from datamodules import PartsWorldDataModule

    pl.seed_everything(0)
    data = PartsWorldDataModule(num_classes=NUM_CLASSES, num_train=64, num_val=16, num_test=16, batch_size=8)
    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, stages=STAGES[1:],
                             model_kwargs={"prototypes_per_class": PER_CLASS, "prototype_channels": 16})
    reference = copy.deepcopy(system.model).eval()
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=1,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[SavePrototypes(tmp_path)])
    trainer.fit(system, datamodule=data)
    dataset = data.split_samples("train")
    loader, indices = push_loader(dataset, 8, None, world_size=1, rank=0)
    apply_push(reference, nearest_patches(reference, loader, indices, "image", "label", torch.device("cpu")),
               (64, 64))
    for rank in (0, 1):
        pushed = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(pushed["vectors"], reference.prototypes.vectors.detach())
        assert torch.equal(pushed["source_index"], reference.prototypes.source_index)
        assert torch.equal(pushed["source_position"], reference.prototypes.source_position)


def test_push_and_its_pictures_read_the_training_images_without_augmentation(image_folder_root: Path,
                                                                              tmp_path: Path) -> None:
    """With `augment=True` (random flips on every read) push reads the training images unflipped, as the paper's
    push loader: the pushed prototypes and sources are those of the same data without augmentation, and the picture
    draws each source as push read it. Push had read the augmented training loader's dataset: prototypes pushed
    onto flipped images about half the time, and drawn with another flip."""
    from datamodules import ImageFolderDataModule
    from zoo.protopnet.callback import PrototypesCallback

    pushed, sources = {}, {}
    for augment in (False, True):
        folder = tmp_path / f"augment={augment}"
        folder.mkdir()
        pl.seed_everything(0)
        data = ImageFolderDataModule(str(image_folder_root), image_size=32, augment=augment, batch_size=4)
        system = ProtoPNetSystem("protopnet_tinycnn", num_classes=2, image_size=32, stages=STAGES[1:],
                                 model_kwargs={"prototypes_per_class": 2, "prototype_channels": 8})
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                             num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                             callbacks=[SavePrototypes(folder)])
        trainer.fit(system, datamodule=data)
        pushed[augment] = torch.load(folder / "rank0.pt", weights_only=True)
        indices = list(range(len(data.splits["train"])))
        sources[augment] = torch.stack(list(PrototypesCallback().sources(trainer, system, indices * 4).values()))
    assert (pushed[True]["source_index"] >= 0).all()
    for key in ("vectors", "source_index", "source_position"):
        assert torch.equal(pushed[True][key], pushed[False][key]), key
    assert torch.equal(sources[True], sources[False])


def test_a_run_killed_after_a_push_resumes_to_the_same_final_state(tmp_path: Path) -> None:
    """Killed inside the last-layer stage (after its push), resumed from last.ckpt (the warm-up epoch's end): the
    resumed run pushes again at the stage's start and ends bit-identical to the run that never died."""
    from tests.test_resume import differing_tensors, kill_and_resume

    extra = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=16",
             "--data.init_args.num_classes=4", "--data.init_args.image_size=32",  # small: the push is what matters
             "--model.init_args.model_kwargs.prototypes_per_class=2",
             f"--model.init_args.stages={STAGES}".replace("'", "")]
    whole_state, again, _ = kill_and_resume(tmp_path, CONFIG, extra, 6, None)
    assert again["global_step"] == whole_state["global_step"] == 12
    assert (whole_state["state_dict"]["model.prototypes.source_index"] >= 0).all()  # the push happened
    differ = differing_tensors(whole_state, again)
    assert not differ, f"{len(differ)} tensors differ: {differ[:8]}"


def authors_schedule() -> list[tuple[str, float, float]]:
    """(stage, backbone lr, rest lr) of each epoch of cfchen-duke/ProtoPNet's main.py through its second push:
    warm-up 5 epochs, then joint epochs whose StepLR(step_size=5, gamma=0.1) steps before each joint epoch, and
    after the joint epochs 10 and 20 a push and 20 epochs of the last layer alone at 1e-4."""
    epochs, joint = [], 0
    for epoch in range(21):
        if epoch < 5:
            epochs.append(("warm_up", 1e-4, 3e-3))
        else:
            joint += 1
            decay = 0.1 ** (joint // 5)
            epochs.append(("joint", 1e-4 * decay, 3e-3 * decay))
        if epoch >= 10 and epoch % 10 == 0:
            epochs += [("last_layer", None, 1e-4)] * 20
    return epochs


def test_cub_config_follows_the_authors_schedule() -> None:
    """configs/protopnet/cub200.yaml: stage, learning rates and epoch count of every epoch as the authors' code."""
    import yaml

    from zoo.engine.stages import Schedule

    config = yaml.safe_load((REPO / "configs/protopnet/cub200.yaml").read_text())
    init = config["model"]["init_args"]
    model = zoo.create_model("protopnet_tinycnn", num_classes=2, prototypes_per_class=1)
    base = config["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    backbone = [p for p in model.backbone.parameters()]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.Adam([{"params": backbone, "lr": base * init["backbone_lr_scale"]},
                                  {"params": rest, "lr": base}])
    schedule = Schedule(init["stages"], model)
    expected = authors_schedule()
    assert config["trainer"]["max_epochs"] == len(expected) == sum(s.epochs for s in schedule.stages)
    for epoch, (stage, backbone_lr, rest_lr) in enumerate(expected):
        schedule.start_epoch(model, optimizer, epoch)
        assert schedule.current.name == stage, epoch
        assert optimizer.param_groups[1]["lr"] == pytest.approx(rest_lr, rel=2e-3), epoch  # 0.0333 for 1/30
        if backbone_lr is not None:
            assert optimizer.param_groups[0]["lr"] == pytest.approx(backbone_lr, rel=2e-3), epoch
    assert init["push_stages"] == ["last_layer"]  # the push opens each last-layer stage


@pytest.mark.parametrize("max_epochs, fast_dev_run, push_stages, warned", [
    (1, False, None, True),  # warm_up only: the last_layer stage (the push) starts at epoch 1
    (2, False, None, False),  # last_layer starts at epoch 1: it pushes
    (1, True, None, False),  # a smoke test may stop anywhere (as the engine's own warning)
    (1, False, ["warm_up", "last_layer"], False),  # warm_up pushes
    (-1, False, None, False)])  # an open budget reaches every stage
def test_protopnet_warns_when_max_epochs_ends_before_every_push_stage(max_epochs: int, fast_dev_run: bool,
                                                                      push_stages: list[str] | None,
                                                                      warned: bool) -> None:
    """A fit whose push stages all start at or after max_epochs never pushes: ProtoPNet says so (the engine's own
    warning said only that the stages are never trained), naming max_epochs and the push stages."""
    from types import SimpleNamespace

    system = ProtoPNetSystem("protopnet_tinycnn", num_classes=NUM_CLASSES, stages=STAGES, push_stages=push_stages,
                             model_kwargs={"prototypes_per_class": 1, "prototype_channels": 8})
    system._trainer = SimpleNamespace(max_epochs=max_epochs, fast_dev_run=fast_dev_run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        system.warn_without_push()
    messages = [str(w.message) for w in caught if "ProtoPNetSystem" in str(w.message)]
    assert bool(messages) == warned, messages
    if warned:
        assert "max_epochs=1 ends before the push stage(s) ['last_layer']" in messages[0]
        assert "no prototype is pushed" in messages[0] and "more than 1" in messages[0]
