"""ProtoPNet's picture: for each image of a fixed validation batch, the prototypes of its predicted class that weigh
most in it, where each fires on the image, and the training image and patch push took it from."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from zoo.backbones import model_map_geometry
from zoo.engine.callbacks import FixedBatchCallback
from zoo.figures import class_name, heatmap_overlay, new_figure
from zoo.protopnet.push import push_source
from zoo.protopnet.system import top_class_prototypes


class PrototypesCallback(FixedBatchCallback):
    """After each validation epoch: one row per image of the fixed batch (one image of each class first): the image
    with its true and predicted class, then for each of the predicted class's own prototypes with the largest
    similarity x last-layer weight for it (at most `top_k`, `top_class_prototypes`), its similarity map over the
    image and its source (the training image with the pushed latent cell's footprint boxed,
    `PrototypeLayer.source_box`; "not pushed yet" before the first push). TensorBoard figure ``prototypes/top``
    and text ``prototypes/table``; ``prototypes/epoch<e>.png`` and ``.md`` in the run folder.
    Models without prototypes (the twins) draw nothing.

    Args:
        num_images: images in the fixed batch; top_k: prototypes shown per image.
    """

    def __init__(self, num_images: int = 6, top_k: int = 3) -> None:
        super().__init__()
        self.num_items, self.top_k = num_images, top_k

    def shown(self, trainer: pl.Trainer, images: torch.Tensor) -> torch.Tensor:
        images = self.displayable(trainer, images)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]

    def sources(self, trainer: pl.Trainer, pl_module: pl.LightningModule, indices: list[int]) -> dict[int, Any]:
        """The training images push took the prototypes from, by dataset index, as push read them (no augmentation)."""
        wanted = sorted({i for i in indices if i >= 0})
        if not wanted:  # nothing pushed yet: no training images to read
            return {}
        dataset = push_source(trainer)[0]
        images = torch.stack([dataset[i][pl_module.input_key] for i in wanted])
        return dict(zip(wanted, self.shown(trainer, images)))

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, shared: Any) -> None:
        model = pl_module.model
        if not model.has_prototypes:
            return
        batch = self.fixed_batch(trainer)
        images = batch[pl_module.input_key].to(pl_module.device)
        out = model(images)
        predicted = out["logits"].argmax(-1)  # (N,)
        top = top_class_prototypes(out, predicted, self.top_k)  # (N, k) the predicted class's own prototypes
        layer = model.prototypes
        source_index, boxes = layer.source_index.cpu(), layer.source_box.cpu()
        owner = layer.prototype_class.cpu()
        sources = self.sources(trainer, pl_module, source_index[top.indices.flatten().cpu()].tolist())
        shown = self.shown(trainer, images)
        maps = out["unit_maps"].float().gather(1, top.indices[..., None, None].expand(-1, -1, *out["unit_maps"].shape[
            -2:]))  # (N, k, h, w)
        geometry = model_map_geometry(model, shown.shape[-2:])  # the cells where the part metrics put them
        overlays = heatmap_overlay(shown.to(maps.device), maps.transpose(0, 1), geometry).cpu()  # (k, N, 3, H, W)
        figure, axes = new_figure(len(images), 1 + 2 * top.indices.shape[1], panel_inches=1.4)
        rows = ["| image | true | predicted | top prototypes (class, similarity x weight, source image) |",
                "| --- | --- | --- | --- |"]
        labels = batch[pl_module.target_key].tolist()
        for row, image in enumerate(shown):
            true_name, predicted_name = (class_name(trainer.datamodule, labels[row]),
                                         class_name(trainer.datamodule, int(predicted[row])))
            axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
            axes[row, 0].set_title(f"true: {true_name}\npred: {predicted_name}", fontsize=7)
            listed = []
            for rank, (prototype, score) in enumerate(zip(top.indices[row].tolist(), top.values[row].tolist())):
                source = int(source_index[prototype])
                axes[row, 1 + 2 * rank].imshow(overlays[rank, row].permute(1, 2, 0).numpy())
                axes[row, 1 + 2 * rank].set_title(f"p{prototype} {score:.2f}", fontsize=7)
                ax = axes[row, 2 + 2 * rank]
                if source in sources:
                    ax.imshow(sources[source].permute(1, 2, 0).numpy())
                    x0, y0, x1, y1 = boxes[prototype].tolist()
                    ax.add_patch(_rectangle(x0, y0, x1, y1))
                    ax.set_title(f"from train #{source}", fontsize=7)
                else:
                    ax.set_title("not pushed yet", fontsize=7)
                listed.append(f"p{prototype} ({class_name(trainer.datamodule, int(owner[prototype]))}, {score:.2f}, "
                              f"{'train #' + str(source) if source >= 0 else 'not pushed'})")
            rows.append(f"| {row} | {true_name} | {predicted_name} | {'<br>'.join(listed)} |")
        markdown = "\n".join(rows) + "\n"
        self.publish(trainer, "prototypes", figure, markdown, "top")


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5)
