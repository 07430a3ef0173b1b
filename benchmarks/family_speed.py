"""Cost of interpretability per family, measured in one run: train-step time and inference throughput of each
interpretable model against its opaque twin / baselines, on the CPU or a GPU, fp32 or bf16 autocast.

    python -m benchmarks.family_speed [--families icnn l2x renn aog textual] [--device cpu|cuda] [--bf16]
        [--rounds 5] [--steps 10]
    python -m benchmarks.family_speed --families --heads vote3 aog3     # two RoI heads alone, in a fresh process
    python -m benchmarks.family_speed --realistic --device cuda [--rows icnn_resnet18 ...] [--scale 1.0]
        [--precisions fp32 bf16] [--compile [inductor | reduce-overhead | cudagraphs | ...]]

`--realistic` times the rows of the GPU issue at the sizes researchers train at (ICNN on resnet18 / vgg16 at
224 px, tinycnn at 64 px batch 256; the AOG heads at 512 RoIs; detectors on resnet18 at 512 px; textual, ReNN and
L2X steps), each row's model against its reference in interleaved rounds, fp32 and bf16 autocast, and prints the
ratios with the issue's targets, each row as soon as it is measured; `--compile [HOW]` compiles both sides of each
row as `--model.init_args.compile=HOW` does (default inductor; "reduce-overhead" replays CUDA graphs). `--scale`
shrinks batches and image sizes (a CPU smoke run: `--device cpu --scale 0.25 --rows icnn_tinycnn renn`).

A train step is forward + loss + backward + optimiser step (+ ICNN's online statistics; + the frozen black box's
forward for L2X). Inference is one forward pass in eval mode (for L2X: explaining a batch). Models of a family
are timed in interleaved rounds (A, B, C, A, B, C, ...) by `benchmarks.timing` so drift hits all alike; the table
gives medians over rounds and ratios of medians against the family's reference (the opaque twin, the black box,
the 1-D CNN). A second table times explanations of the same switch samples: L2X's explainer (one batched forward)
against Captum's IntegratedGradients, KernelShap and Lime on the black box (explanation time does not depend on
how well either is trained; `python -m benchmarks.l2x_race` scores their quality). For AOG R-CNN a train step is a
detector step on 4 scenes (RPN + RoI losses), and a third table times the RoI heads alone (box_roi_pool +
box_head + box_predictor, forward + backward, `--head_rois` RoIs, 21 classes) at 3x3 and 7x7. For textual
explanations a train step is the System's loss on 32 images with 18-token references (the frozen encoder's forward
included) and inference is greedy decoding of 32 explanations; the reference is the description model (same
captioner, no class input), and the plain classifier's row shows what explaining costs over classifying. CPU
figures are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

import zoo
from benchmarks.devices import add_device_argument, device_name
from benchmarks.timing import interleaved_medians, ratios
from datamodules.l2x_synthetic import generate as l2x_data
from datamodules.rule_series import generate as series_data
from losses.baselines import ClassificationLoss
from losses.icnn import FilterPartLoss
from losses.l2x import L2XLoss
from losses.renn import ReNNLoss
from losses.textual import DiscriminativeLoss, RelevanceLoss
from zoo.engine.system import compile_model
from zoo.textual.model import ExplanationModel, SentenceClassifier

Step = Callable[[], None]


def train_step(model: nn.Module, loss: nn.Module, batch: dict, input_key: str, device: torch.device, bf16: bool,
               teacher: nn.Module | None = None) -> Step:
    """One optimiser step of `model` on `batch` (the teacher, if any, gives L2X its soft targets)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        model.train()  # the inference step of the same model leaves it in eval mode
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            inputs = batch[input_key]
            extra = {}
            if teacher is not None:
                with torch.no_grad():
                    extra["teacher_probs"] = teacher(inputs)["logits"].float().softmax(-1)
            out = model(inputs, batch["targets"]) if "targets" in batch else model(inputs)
            if hasattr(model, "update_statistics"):
                model.update_statistics(out, batch)
            total = sum(loss(out, {**batch, **extra}).values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step


def infer_step(model: nn.Module, batch: dict, input_key: str, device: torch.device, bf16: bool) -> Step:
    def step() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(batch[input_key])

    return step


def to(batch: dict, device: torch.device) -> dict:
    """Tensors of a dict batch on `device`."""
    return {k: v.to(device) for k, v in batch.items()}


def family_setups(family: str, device: torch.device) -> tuple[str, dict, str, dict[str, tuple[nn.Module, nn.Module]],
                                                             nn.Module | None]:
    """(reference name, batch, input key, {name: (model, loss)}, teacher)."""
    torch.manual_seed(0)
    if family == "icnn":
        batch = {"image": torch.rand(32, 3, 64, 64), "label": torch.randint(0, 6, (32,))}
        icnn = {"image_size": 64, "tau_scale": 16.0, "num_classes": 6}
        models = {
            "icnn_tinycnn": (zoo.create_model("icnn_tinycnn", **icnn), FilterPartLoss(weight=1.0)),
            "twin (lambda 0)": (zoo.create_model("icnn_tinycnn", **icnn), FilterPartLoss(weight=0.0)),
            "baseline_tinycnn": (zoo.create_model("baseline_tinycnn", num_classes=6), ClassificationLoss()),
        }
        return "twin (lambda 0)", to(batch, device), "image", models, None
    if family == "l2x":
        data = l2x_data("switch", 256, seed=0)
        black_box = zoo.create_model("baseline_mlp", num_features=10, num_classes=2).to(device).eval()
        models = {
            "l2x_vector (k=5)": (zoo.create_model("l2x_vector", k=5), L2XLoss()),
            "black box (baseline_mlp)": (zoo.create_model("baseline_mlp", num_features=10), ClassificationLoss()),
        }
        return "black box (baseline_mlp)", to(data, device), "features", models, black_box
    if family == "renn":
        data = series_data(64, seed=0)
        models = {
            "renn_series": (zoo.create_model("renn_series"), ReNNLoss()),
            "baseline_cnn1d": (zoo.create_model("baseline_cnn1d"), ClassificationLoss()),
            "baseline_lstm": (zoo.create_model("baseline_lstm"), ClassificationLoss()),
        }
        return "baseline_cnn1d", to(data, device), "series", models, None
    if family == "aog":
        scenes = [torch.rand(3, 128, 128) for _ in range(4)]
        targets = [{"boxes": torch.tensor([[10.0, 12, 50, 48], [70, 60, 110, 100]]), "labels": torch.tensor([1, 3])}
                   for _ in scenes]
        batch = {"images": [im.to(device) for im in scenes],
                 "targets": [{k: v.to(device) for k, v in t.items()} for t in targets]}
        models = {name: (zoo.create_model(name, num_classes=4, image_size=128), DetectorLoss())
                  for name in ("aog_rcnn_tinycnn", "vote_rcnn_tinycnn", "faster_rcnn_tinycnn")}
        return "vote_rcnn_tinycnn", batch, "images", models, None
    if family == "textual":
        images, labels = torch.rand(32, 3, 64, 64), torch.randint(0, 6, (32,))
        captions = torch.randint(3, 25, (32, 18))
        captions[:, 0], captions[:, 12:] = 1, 0  # <bos> ... 11 words, then padding
        captions[:, 11] = 2  # <eos>
        encoder = zoo.create_model("baseline_tinycnn", num_classes=6).eval()  # frozen, shared, as in the System
        classifier = SentenceClassifier(25, 6).requires_grad_(False).eval()
        models: dict[str, tuple[nn.Module, nn.Module]] = {
            name: (ExplanationStep(ExplanationModel(encoder, encoder.backbone.num_features, 6, 25, variant=variant,
                                                    max_len=18), classifier, labels, captions, weight),
                   ExplanationLoss(weight))
            for name, variant, weight in (("explanation (relevance + REINFORCE)", "explanation", 0.2),
                                          ("explanation-label (relevance)", "explanation-label", 0.0),
                                          ("description (captioner, no class)", "description", 0.0))}
        models["classifier alone (baseline_tinycnn)"] = (zoo.create_model("baseline_tinycnn", num_classes=6),
                                                         ClassificationLoss())
        return "description (captioner, no class)", to({"image": images, "label": labels}, device), "image", \
            models, None
    raise ValueError(f"Unknown family {family!r}; choose from icnn, l2x, renn, aog, textual.")


class ExplanationStep(nn.Module):
    """A textual explanation model on a fixed batch: in training, teacher forcing on the first reference (plus, when
    the discriminative weight is on, a sampled sentence and its reward from the frozen sentence classifier); in
    eval, greedy decoding of the batch's explanations."""

    def __init__(self, model: nn.Module, classifier: nn.Module, labels: torch.Tensor, captions: torch.Tensor,
                 discriminative_weight: float) -> None:
        super().__init__()
        self.model, self.classifier, self.discriminative = model, classifier, discriminative_weight > 0
        self.register_buffer("labels", labels)
        self.register_buffer("captions", captions)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training:
            return {"sentences": self.model.explain(images, self.labels)[0]}
        out = {**self.model(images, self.labels, self.captions, sample=self.discriminative), "tokens": self.captions}
        if self.discriminative:  # as TextualSystem samples
            out["reward"] = self.classifier.true_class_probability(out["samples"], self.labels)
        return out

    def train(self, mode: bool = True) -> ExplanationStep:
        super().train(mode)
        self.classifier.eval()
        self.model.image_encoder.eval()  # frozen encoder, as TextualSystem keeps it
        return self


class ExplanationLoss(nn.Module):
    """Relevance (teacher-forced CE) plus, with a weight, REINFORCE: the TextualSystem's training loss."""

    def __init__(self, discriminative_weight: float) -> None:
        super().__init__()
        self.relevance, self.discriminative = RelevanceLoss(), DiscriminativeLoss(discriminative_weight)

    def forward(self, out: dict, batch: dict) -> dict:
        terms = self.relevance(out, out)
        return terms | self.discriminative(out, batch) if "reward" in out else terms


class DetectorLoss(nn.Module):
    """torchvision detectors return their loss terms themselves; the benchmark's step sums them."""

    def forward(self, losses: dict, batch: dict) -> dict:
        return losses


class HeadSpec(NamedTuple):
    """One timed RoI head: its table row, the grid of the average vote it is compared with, and how it is built."""
    name: str
    grid: int
    head: str  # "vote", "aog" or "mlp"
    maps: str = "terminals"
    rank: int | None = None
    dp_kernel: str = "waves"  # "triton": the DP as two Triton kernels (CUDA; the waves elsewhere)


HEADS = {  # --heads key: what it times
    "vote3": HeadSpec("average vote 3x3 (R-FCN)", 3, "vote"),
    "aog3": HeadSpec("AOGParsing 3x3, terminal maps", 3, "aog"),
    "aog3_rank32": HeadSpec("AOGParsing 3x3, terminal maps rank 32", 3, "aog", rank=32),
    "aog3_cells": HeadSpec("AOGParsing 3x3, shared cell maps", 3, "aog", "cells"),
    "mlp": HeadSpec("TwoMLPHead (RoIAlign 7x7)", 3, "mlp"),
    "vote7": HeadSpec("average vote 7x7", 7, "vote"),
    "aog7": HeadSpec("AOGParsing 7x7, terminal maps", 7, "aog"),
    "aog7_rank32": HeadSpec("AOGParsing 7x7, terminal maps rank 32", 7, "aog", rank=32),
    "aog7_cells": HeadSpec("AOGParsing 7x7, shared cell maps", 7, "aog", "cells"),
    "aog7_triton": HeadSpec("AOGParsing 7x7, terminal maps, Triton DP", 7, "aog", dp_kernel="triton"),
}


def head_speed(device: torch.device, rounds: int, rois: int, classes: int = 21, channels: int = 256,
               keys: list[str] | None = None) -> list[dict]:
    """Forward + backward of the RoI heads alone on the same features and proposals: AOGParsing (per-terminal maps at
    full rank and through 32 shared basis maps, and shared cell maps) and R-FCN's average vote at 3x3, torchvision's
    TwoMLPHead, and the same at 7x7. `keys` (of HEADS) times a subset; the vote on the same grid always runs.

    The heads share one process, so their multi-MB temporaries meet whatever state earlier steps left glibc's
    allocator in: timed alone in a fresh process a head can pay page faults that it does not pay next to larger
    heads (`--heads vote3 aog3` against the default set shows how much)."""
    steps = head_steps(device, rois, classes, channels, keys)
    median = interleaved_medians(steps, device, rounds, calls=3, warmup=1)
    reference = {spec.name: median[HEADS[f"vote{spec.grid}"].name] for spec in HEADS.values() if spec.name in median}
    return [{"head": name, "ms": round(1e3 * m, 2), "vs_vote": round(m / reference[name], 3)}
            for name, m in median.items()]


def head_steps(device: torch.device, rois: int, classes: int = 21, channels: int = 256,
               keys: list[str] | None = None) -> dict[str, Step]:
    """{head name: one forward + backward of it} for the chosen HEADS keys and the vote on each one's grid, all on
    the same features and random proposals (`head_speed`)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from zoo.aog_rcnn.model import AOGParsingHead, AverageVoteHead, GridGrammar, PositionSensitivePool, VotePredictor

    torch.manual_seed(0)
    features = {"0": torch.randn(2, channels, 32, 32, device=device)}  # two 512 x 512 images at stride 16
    corners = torch.rand(2, rois // 2, 2, 2, device=device).sort(2).values * 512
    proposals = [c.flatten(1) for c in corners.unbind(0)]  # (rois/2, 4) xyxy each, random boxes
    shapes = [(512, 512)] * 2

    def build(spec: HeadSpec) -> tuple[nn.Module, ...]:
        if spec.head == "mlp":
            return MultiScaleRoIAlign(["0"], 7, 2), TwoMLPHead(channels * 49, 1024), FastRCNNPredictor(1024, classes)
        grammar = GridGrammar(spec.grid, spec.grid)
        maps = spec.maps if spec.head == "aog" else "cells"
        pool = PositionSensitivePool(channels, classes, grammar, maps, terminal_rank=spec.rank)
        box_head = AOGParsingHead(grammar, "max", maps, spec.dp_kernel) if spec.head == "aog" else AverageVoteHead()
        return pool, box_head, VotePredictor()

    chosen = set(keys or HEADS)
    chosen |= {f"vote{HEADS[key].grid}" for key in chosen}  # each head's reference vote
    heads = {spec.name: build(spec) for key, spec in HEADS.items() if key in chosen}

    def step_of(modules: tuple[nn.Module, ...]) -> Step:
        pool, box_head, predictor = (m.to(device) for m in modules)

        def step() -> None:
            feats = {"0": features["0"].detach().requires_grad_()}
            logits, boxes = predictor(box_head(pool(feats, proposals, shapes)))
            (logits.sum() + boxes.sum()).backward()

        return step

    return {name: step_of(modules) for name, modules in heads.items()}


class Row(NamedTuple):
    """One row of the realistic table: `model` timed against `reference` (both train steps), the issue's target."""
    name: str
    model: str
    reference: str
    target: float


REALISTIC = {  # --rows key: the row
    "icnn_resnet18": Row("icnn_resnet18 224 px batch 64, 200 classes: ICNN / ordinary twin", "icnn", "ordinary twin",
                         1.15),
    "icnn_resnet18_masks": Row("icnn_resnet18 224 px: masked twin / ordinary twin (the masks alone)", "masked twin",
                               "ordinary twin", 1.05),
    "icnn_vgg16": Row("icnn_vgg16 224 px batch 32: ICNN / ordinary twin", "icnn", "ordinary twin", 1.10),
    "icnn_tinycnn": Row("icnn_tinycnn 64 px batch 256: ICNN / ordinary twin", "icnn", "ordinary twin", 1.30),
    "aog3": Row("AOGParsing head 3x3 / average vote (512 RoIs, 21 classes, fwd + bwd)", "aog3", "vote3", 2.0),
    "aog7": Row("AOGParsing head 7x7 / average vote 7x7", "aog7", "vote7", 3.0),
    "aog7_triton": Row("AOGParsing head 7x7, Triton DP / average vote 7x7", "aog7_triton", "vote7", 3.0),
    "aog_rcnn": Row("aog_rcnn detector step / vote detector (resnet18, 512 px, batch 4)", "aog_rcnn_resnet18",
                    "vote_rcnn_resnet18", 1.05),
    "textual": Row("textual explanation step (relevance + REINFORCE) / description step",
                   "explanation (relevance + REINFORCE)", "description (captioner, no class)", 2.5),
    "renn": Row("renn_series / baseline_cnn1d", "renn_series", "baseline_cnn1d", 1.3),
    "l2x": Row("l2x_vector / its black box", "l2x_vector (k=5)", "black box (baseline_mlp)", 1.5),
}
ICNN_BACKBONES = {"icnn_resnet18": ("icnn_resnet18", 224, 64), "icnn_resnet18_masks": ("icnn_resnet18", 224, 64),
                  "icnn_vgg16": ("icnn_vgg16", 224, 32), "icnn_tinycnn": ("icnn_tinycnn", 64, 256)}


def scaled(value: int, scale: float, least: int) -> int:
    return max(least, round(value * scale))


def realistic_setup(key: str, device: torch.device, scale: float) -> tuple[dict, str, dict, nn.Module | None]:
    """(batch, input key, {name: (model, loss)} with the row's model and reference, teacher) of a model row."""
    torch.manual_seed(0)
    row = REALISTIC[key]
    if key in ICNN_BACKBONES:
        name, size, batch_size = ICNN_BACKBONES[key]
        size, batch_size = scaled(size, scale, 32) // 32 * 32, scaled(batch_size, scale, 2)
        batch = {"image": torch.rand(batch_size, 3, size, size), "label": torch.randint(0, 200, (batch_size,))}
        kw = {"image_size": size, "num_classes": 200, "tau_scale": 16.0}
        variants = {"icnn": (True, 1.0), "masked twin": (True, 0.0), "ordinary twin": (False, 0.0)}
        models = {variant: (zoo.create_model(name, masks=masks, **kw), FilterPartLoss(weight=weight))
                  for variant, (masks, weight) in variants.items() if variant in (row.model, row.reference)}
        return to(batch, device), "image", models, None
    if key == "aog_rcnn":
        size, count = scaled(512, scale, 128), scaled(4, scale, 1)
        boxes = torch.tensor([[0.1, 0.12, 0.5, 0.48], [0.55, 0.5, 0.95, 0.9]]) * size
        batch = {"images": [torch.rand(3, size, size, device=device) for _ in range(count)],
                 "targets": [{"boxes": boxes.to(device), "labels": torch.tensor([1, 3], device=device)}
                             for _ in range(count)]}
        models = {name: (zoo.create_model(name, num_classes=20, image_size=size), DetectorLoss())
                  for name in (row.model, row.reference)}
        return batch, "images", models, None
    _, batch, input_key, models, teacher = family_setups(key, device)
    return batch, input_key, {name: models[name] for name in (row.model, row.reference)}, teacher


def row_steps(key: str, device: torch.device, scale: float, bf16: bool, compile: str | None = None
              ) -> dict[str, Step]:
    """{name: train step} of a model row's model and reference on `device` (compiled as `compile=<compile>` does)."""
    batch, input_key, models, teacher = realistic_setup(key, device, scale)
    steps = {}
    for name, (model, loss) in models.items():
        model.to(device)
        loss.to(device)
        if compile:
            compile_model(model, compile)
        steps[name] = train_step(model, loss, batch, input_key, device, bf16,
                                 teacher if name == REALISTIC[key].model else None)
    return steps


def realistic(device: torch.device, rounds: int, steps: int, scale: float, keys: list[str],
              precisions: tuple[str, ...] = ("fp32", "bf16"), compile: str | None = None) -> Iterator[dict]:
    """Every chosen row in each precision (fp32, bf16 autocast): medians of interleaved rounds and the row's ratio,
    one row at a time (a long GPU run reports what it has measured when it is cut short). `compile`: the model and
    its reference are both `torch.compile`d as `--model.init_args.compile=<compile>` compiles them (a backend or an
    inductor mode), and timed after their warm-up steps have compiled them; the RoI-head rows run eagerly."""
    for key in keys:
        row = REALISTIC[key]
        for bf16 in (precision == "bf16" for precision in precisions):
            if row.model in HEADS:  # a row of RoI heads alone (`head_speed`)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    heads = {r["head"]: r["ms"] for r in head_speed(device, rounds, scaled(512, scale, 16),
                                                                      keys=[row.model])}
                model_ms, reference_ms = heads[HEADS[row.model].name], heads[HEADS[row.reference].name]
            else:
                median = interleaved_medians(row_steps(key, device, scale, bf16, compile), device, rounds,
                                             calls=steps, warmup=2)
                model_ms, reference_ms = 1e3 * median[row.model], 1e3 * median[row.reference]
            yield {"row": row.name, "precision": "bf16" if bf16 else "fp32", "model_ms": round(model_ms, 2),
                   "reference_ms": round(reference_ms, 2), "ratio": round(model_ms / reference_ms, 3),
                   "target": row.target, "compiled": compile if row.model not in HEADS else None}


def measure(family: str, device: torch.device, bf16: bool, rounds: int, steps: int) -> list[dict]:
    reference, batch, key, models, teacher = family_setups(family, device)
    variants: dict[tuple[str, str], Step] = {}  # timed in this order: A train, A infer, B train, B infer, ...
    for name, (model, loss) in models.items():
        model.to(device)
        loss.to(device)
        variants[name, "train"] = train_step(model, loss, batch, key, device, bf16, teacher if "l2x" in name else None)
        variants[name, "infer"] = infer_step(model, batch, key, device, bf16)
    median = interleaved_medians(variants, device, rounds, calls=steps, warmup=2)
    train = ratios({name: median[name, "train"] for name in models}, reference)
    infer = ratios({name: median[name, "infer"] for name in models}, reference)
    batch_size = len(batch[key])
    return [{
        "family": family, "model": name, "train_ms": round(1e3 * median[name, "train"], 2),
        "train_vs_ref": round(train[name], 3),
        "infer_samples_per_s": round(batch_size / median[name, "infer"], 1),
        "infer_vs_ref": round(1 / infer[name], 3),
    } for name in models]


def explanation_speed(device: torch.device, rounds: int, samples: int = 256, per_sample: int = 8) -> list[dict]:
    """Samples/s of explaining switch data: L2X batched vs Captum (IG batched; KernelShap/Lime one surrogate per
    sample, timed on `per_sample` samples). Medians over interleaved rounds, after one warm-up call each."""
    from zoo.explain.captum import attribute_features

    torch.manual_seed(0)
    data = to(l2x_data("switch", samples, seed=1), device)
    x = data["features"]
    black_box = zoo.create_model("baseline_mlp", num_features=10).to(device).eval()
    explainer = zoo.create_model("l2x_vector", k=5).to(device).eval()
    target = black_box(x)["logits"].argmax(-1)

    def l2x() -> None:
        with torch.no_grad():
            explainer(x)

    methods: dict[str, tuple[Step, int]] = {"l2x": (l2x, len(x))}
    for method, count in (("integrated_gradients", len(x)), ("kernel_shap", per_sample), ("lime", per_sample)):
        if method == "integrated_gradients":
            methods[method] = (lambda: attribute_features(black_box, x, target, "integrated_gradients"), count)
        else:
            methods[method] = (lambda m=method: [attribute_features(black_box, x[i: i + 1], target[i: i + 1], m)
                                                  for i in range(per_sample)], count)
    seconds = interleaved_medians({name: step for name, (step, _) in methods.items()}, device, rounds)
    rate = {name: methods[name][1] / seconds[name] for name in methods}
    return [{"method": name, "samples_per_s": round(r, 1), "l2x_speedup": round(rate["l2x"] / r, 1)}
            for name, r in rate.items()]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=["icnn", "l2x", "renn", "aog", "textual"],
                        help="families whose steps are timed (none: only the --heads table)")
    parser.add_argument("--head_rois", type=int, default=512, help="RoIs in the AOG head timing")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=None,
                        help="time only these RoI heads (and the vote on their grid); default: all")
    add_device_argument(parser)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--realistic", action="store_true", help="the GPU issue's table at realistic sizes")
    parser.add_argument("--rows", nargs="+", choices=list(REALISTIC), default=list(REALISTIC),
                        help="--realistic: these rows only")
    parser.add_argument("--scale", type=float, default=1.0, help="--realistic: batch and image sizes times this")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="--realistic: fp32 and/or bf16 autocast")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="HOW",
                        help="--realistic: torch.compile each model and its reference, as compile=HOW does (a backend "
                             "or an inductor mode; default inductor)")
    args = parser.parse_args(argv)
    device = args.device
    if args.realistic:
        return print_realistic(device, args.rounds, args.steps, args.scale, args.rows, tuple(args.precisions),
                               args.compile)
    rows = [row for family in args.families for row in measure(family, device, args.bf16, args.rounds, args.steps)]
    name = device_name(device)
    print(f"torch {torch.__version__}, {name}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.rounds} rounds x {args.steps} steps (medians; ratios against each family's reference)")
    if rows:
        print("| family | model | train ms | train / ref | infer samples/s | infer speed / ref |")
        print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['family']} | {r['model']} | {r['train_ms']} | {r['train_vs_ref']} | {r['infer_samples_per_s']} "
              f"| {r['infer_vs_ref']} |")
    if "l2x" in args.families:
        print("\n| explanation method (switch, d = 10) | samples/s | L2X speed-up |\n| --- | --- | --- |")
        for r in explanation_speed(device, args.rounds):
            print(f"| {r['method']} | {r['samples_per_s']} | {r['l2x_speedup']} |")
            rows.append({"family": "l2x explanation", **r})
    if "aog" in args.families or args.heads:
        print(f"\n| RoI head ({args.head_rois} RoIs, 21 classes, fwd + bwd) | ms | vs average vote (same grid) |\n"
              "| --- | --- | --- |")
        for r in head_speed(device, args.rounds, args.head_rois, keys=args.heads):
            print(f"| {r['head']} | {r['ms']} | {r['vs_vote']} |")
            rows.append({"family": "aog head", **r})
    return rows


def print_realistic(device: torch.device, rounds: int, steps: int, scale: float, keys: list[str],
                    precisions: tuple[str, ...] = ("fp32", "bf16"), compile: str | None = None) -> list[dict]:
    """The realistic table, printed row by row as each is measured."""
    name = device_name(device)
    print(f"torch {torch.__version__}, {name}, scale {scale}, {rounds} rounds x {steps} steps (medians of interleaved "
          f"rounds; train steps{f'; model and reference compiled ({compile})' if compile else ''})")
    print("| row | precision | model ms | reference ms | ratio | target |\n| --- | --- | --- | --- | --- | --- |",
          flush=True)
    rows = []
    for r in realistic(device, rounds, steps, scale, keys, precisions, compile):
        precision = r["precision"] + (f", {r['compiled']}" if r["compiled"] else "")
        print(f"| {r['row']} | {precision} | {r['model_ms']} | {r['reference_ms']} | {r['ratio']} | "
              f"<= {r['target']} |", flush=True)
        rows.append(r)
    return rows


if __name__ == "__main__":
    main()
