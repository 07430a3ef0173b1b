"""The textual explanation heads' System (Hendricks et al., ECCV 2016): ZooSystem hooks, two auxiliaries, TWINS."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import BLEUScore

from datamodules._base import decode_tokens
from zoo.checks import batch_field, check_class_ids, ids_out_of_range
from zoo.distributed import all_reduce_
from zoo.engine import Auxiliary, ZooSystem
from zoo.registry import create_model, create_model_for_data
from zoo.textual.metrics import AttributeMention, CIDErD, ClassRelevance, RougeL, as_text, reference_texts
from zoo.textual.model import VARIANTS, variant_model_name
from zoo.weights import (DATA_RESUME_FREE, CheckpointError, _same_setting, _shown, check_class_names,
                         load_module_weights, read_checkpoint, weights_will_be_replaced)

COMPATIBLE_KEYS = ("variant", "num_classes", "vocab_size", "encoder", "class_features")
# the stage-1 config (configs/textual/<name>.yaml) whose checkpoint a stage-2 variant's init_checkpoint names
STAGE_ONE_CONFIGS = {"explanation": "explanation_label", "explanation-dis": "description"}
# Datamodule settings a stage-2 run may give otherwise than the stage it starts from (`check_stage_data`): where the
# files are and how they are loaded (`zoo.weights.DATA_RESUME_FREE`), how many samples are drawn and into which
# split, the batch size. Every other one (the world and its classes, the image size, the normalisation, the
# sentences' length and vocabulary, ...) decides what the stage's image encoder and sentence classifier learnt.
# CUB's sentence settings too: how many references an image carries and where they are cut change no class, image
# or word (`max_vocab`: a vocabulary of other words is refused apart, `_settle_vocabulary`).
STAGE_DATA_FREE = DATA_RESUME_FREE + ("num_train", "num_val", "val_fraction", "test_fraction", "batch_size", "seed",
                                      "max_vocab", "sentences_per_image", "max_sentence_len")
# TextualSystem arguments that `build_model` also passes to the model: a model_kwargs value must agree with them
SIZE_KEYS = ("feature_dim", "class_dim", "embed_dim")  # the generator's sizes a model_kwargs sets (`size_differences`)
LINKED_ARGUMENTS = ("vocab_size", "encoder", "hidden", "max_len", "train_encoder", "class_features", "encoder_kwargs",
                    "vocabulary")
# Set while `TextualSystem.load_from_checkpoint` builds a System from a checkpoint's model_kwargs (none given): their
# linked entries are the checkpoint's record of its System arguments, which the arguments given at load override
_RECORDED_MODEL_KWARGS: ContextVar[bool] = ContextVar("recorded_model_kwargs", default=False)


SENTENCES_HELP = ("The textual models train on reference sentences, batch[captions_key] (B, R, L): R sentences per "
                  "image as token ids <bos> words <eos> <pad>... PartsWorldDataModule makes them; CUB200DataModule "
                  "reads Reed et al.'s text_c10 sentences, looked for in <root>/CUB_200_2011/text_c10 and "
                  "<root>/text_c10 (--data.init_args.sentences_root names another folder).")


def encoder_batch_loss(encoder: nn.Module, batch: dict[str, Any], input_key: str, target_key: str) -> torch.Tensor:
    """The image encoder's training loss: cross-entropy of its logits on the labels."""
    return F.cross_entropy(encoder(batch[input_key])["logits"], batch[target_key])


def reference_rows(captions: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """(B, R) bool: which reference rows of captions (B, R, L) hold a sentence (a word or <eos> after <bos>); the
    others are all padding (a CUB image with fewer sentences than `sentences_per_image`)."""
    return (captions[..., 1:] != pad).any(-1)


def batch_captions(batch: Any, key: str) -> torch.Tensor:
    """batch[key], the reference sentences (B, R, L), with an error that says what is missing or mis-shaped (a
    bare KeyError, or a broadcast error deep in the loss for one sentence per image, said neither)."""
    if not isinstance(batch, dict) or key not in batch:
        held = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"The batch has no {key!r} (reference sentences); it holds {held}. {SENTENCES_HELP}")
    captions = batch[key]
    if not isinstance(captions, torch.Tensor) or captions.ndim != 3 or captions.is_floating_point():
        got = f"{captions.dtype} {tuple(captions.shape)}" if isinstance(captions, torch.Tensor) else type(captions)
        raise ValueError(f"batch[{key!r}] must hold integer token ids of shape (B, R, L), R reference sentences per "
                         f"image; got {got}. One sentence per image (B, L) is captions[:, None].")
    return captions


def starts_with_bos(captions: torch.Tensor, start_token: int, pad: int = 0) -> torch.Tensor:
    """() bool tensor: every sentence of captions (B, R, L) starts with the start token (all-padding rows are no
    sentences). The model reads tokens[:, :-1] to predict tokens[:, 1:], so a sentence without <bos> silently
    loses its first word, and the sentence classifier too reads the words after position 0."""
    return ((captions[..., 0] == start_token) | ~reference_rows(captions, pad)).all()


def no_bos_message(key: str, start_token: int) -> str:
    return (f"batch[{key!r}] holds sentences that do not start with the start token (id {start_token}): each "
            f"reference row must be <bos> words <eos> <pad>... (the model predicts tokens[1:] from tokens[:-1], so "
            f"the first word would be dropped).")


def sentence_classifier_batch_loss(classifier: nn.Module, batch: dict[str, Any], captions_key: str,
                                   target_key: str, start_token: int = 1) -> torch.Tensor:
    """The sentence classifier's training loss: cross-entropy on every reference sentence of the batch; all-padding
    rows are no sentences and are left out (0 when the batch has none, still with a gradient path). Captions on
    the CPU are checked here (start token, ids below the classifier's vocabulary): it is the first auxiliary
    trained, so bad sentences are named before the image encoder trains."""
    captions = batch_captions(batch, captions_key)  # (B, R, L)
    if captions.device.type == "cpu":  # no device read on an accelerator
        vocab_size = classifier.embed.num_embeddings
        span = ids_out_of_range(captions, 0, vocab_size - 1)
        if span is not None:
            raise ValueError(f"captions hold token ids {span[0]}..{span[1]} outside the sentence classifier's "
                             f"vocab_size {vocab_size}: set --model.init_args.vocab_size to the data's vocabulary "
                             f"size (len(datamodule.vocabulary)).")
        if not bool(starts_with_bos(captions, start_token)):
            raise ValueError(no_bos_message(captions_key, start_token))
    words = captions[..., 1:].flatten(0, 1)  # (B*R, L-1) every reference, without <bos>
    labels = batch[target_key].repeat_interleave(captions.shape[1])
    real = reference_rows(captions).flatten().float()  # (B*R,)
    losses = F.cross_entropy(classifier(words)["logits"].float(), labels, reduction="none")  # (B*R,)
    return (losses * real).sum() / real.sum().clamp(min=1)


class TextualSystem(ZooSystem):
    """Train one variant of Hendricks et al.'s textual explanation model (`zoo.textual.model.VARIANTS`), built from
    the registry as `textual_<variant>`.

    Auxiliaries (`zoo.engine.Auxiliary`, trained by a real Trainer before the first step, cached in the run folder,
    or loaded from `encoder_checkpoint` / `sentence_classifier_checkpoint`): the image encoder (a registered
    classifier trained on the labels for `encoder_epochs`, frozen unless `train_encoder`) and the sentence
    classifier (trained on the reference sentences for `sentence_classifier_epochs`, frozen; its probability of the
    true class is the discriminative reward). `init_checkpoint` starts from an earlier stage's checkpoint
    (explanation-label -> explanation, description -> explanation-dis), auxiliaries included. With
    `class_features="description"` the class table is filled from `description_checkpoint` at fit start.

    Loss (`losses.textual.TextualLoss`): `relevance_weight` x teacher-forced CE on one random reference per image
    (drawn uniformly among its non-empty rows; all-padding rows, as CUB has, are never picked unless an image has
    nothing else, and then the relevance loss ignores them),
    plus `discriminative_weight` x REINFORCE on sampled sentences (sampled only while the current stage sums
    `loss_discriminative`, so `stages` can express the chain: relevance only, then relevance + discriminative).
    Validation and test decode greedily and log `cider_d`, `bleu_4`, `rouge_l` (F-measure against the best
    reference), `class_similarity`, `class_rank` (lower is better), `attribute_precision` / `attribute_recall`
    (when the datamodule has `mentioned`, as parts_world has) and `acc`: the sentence classifier's accuracy on the
    generated sentences (how class-discriminative they are; the checkpoint monitor). Training logs `train/reward`.

    Output dict of `forward_batch`: training {"word_logits" (B, L-1, V), "tokens" (B, L) the teacher-forced
    reference, and when sampling "samples" (B, T), "sample_log_probs" (B, T), "reward" (B,)}; evaluation
    {"images" (B, C, H, W), "labels" (B,), "references" (B, R, L), "sentences" (B, T) greedy, "sentence_log_probs"
    (B, T), "sentence_logits" (B, classes) of the sentence classifier}.

    `sentence_classifier_dropout`: the sentence classifier's dropout before its linear layer, the paper's 0.75.
    `sentence_classifier_kwargs`: its other sizes (`SentenceClassifier`: `{embed_dim: 128, hidden: 256}` by default);
    the generator's sizes are `hidden` and `model_kwargs` (`{feature_dim: 128, class_dim: 64, embed_dim: 128}` by
    default, `ExplanationModel`).

    `encoder_kwargs`: keyword arguments of the image encoder's model (`zoo.create_model(encoder, ...)`):
    `{pretrained_path: resnet18.pth}` with `encoder: baseline_resnet18` starts it from ImageNet weights before its
    `encoder_epochs` on the labels; the data's `mean: pretrained` then takes that backbone's mean and std.

    `init_checkpoint` gives the generator (and the auxiliaries that have no checkpoint of their own: a given
    `encoder_checkpoint` / `sentence_classifier_checkpoint` wins, so one judge can serve a whole ablation). It is
    not read where a checkpoint restore replaces every weight next (`zoo.weights.checkpoint_replaces_weights`:
    `validate` / `test` / `predict` / `fit --ckpt_path FILE`, `--ckpt_path last` where a last checkpoint exists,
    `load_from_checkpoint`): the stage-1 file may be gone. Nor is a helper's own checkpoint on a resumed fit
    (`zoo.cli.lightning.prepare_fit_auxiliaries`): the restore brings the helpers too.

    `vocabulary`: the data's words by token id, recorded at fit start from the datamodule's `vocabulary` (saved in
    the checkpoint's hyperparameters and in the model's `model_kwargs`, so an export decodes its own sentences);
    a datamodule with another vocabulary is refused by name, and so is a `vocab_size` below its length.

    `predict_step` (`train.py predict`): each image's greedy sentence, decoded to words (the datamodule's `decode`,
    else `vocabulary`), conditioned on the batch's label (without one: the image encoder's class), and the sentence
    classifier's class probabilities of that sentence as the prediction: predictions.csv gets `explanation` (and
    `explained_class` for the variants that read a class).

    Twins (`train.py compare --config configs/textual/<x>.yaml`): the description model (image only, from scratch,
    no discriminative loss), the explanation-label model (image and class, from scratch: for the stage-1 configs the
    model that adds the class) and `no_discriminative`: the config's own variant from the same init_checkpoint with
    discriminative_weight 0 (for explanation.yaml and explanation_dis.yaml the equal-budget control of the
    discriminative loss; explanation with weight 0 is explanation-label's model and loss).
    """

    TWINS: ClassVar[dict[str, list[str]]] = {
        "description": ["--model.init_args.variant=description", "--model.init_args.discriminative_weight=0",
                        "--model.init_args.init_checkpoint=null"],
        "explanation_label": ["--model.init_args.variant=explanation-label", "--model.init_args.discriminative_weight=0",
                              "--model.init_args.init_checkpoint=null"],
        "no_discriminative": ["--model.init_args.discriminative_weight=0"],
    }
    # arguments validate / test / predict of a checkpoint take as given (`zoo.cli.lightning.evaluation_free`): the
    # decoding length changes no weight, as `load_from_checkpoint(path, max_len=4)` honours it
    EVALUATION_FREE: ClassVar[tuple[str, ...]] = ("max_len",)
    # the explanations are sentences (predictions.csv's `explanation`): `train.py predict` draws no pictures
    PREDICT_PICTURES: ClassVar[bool] = False

    def __init__(
        self,
        variant: str = "explanation",
        num_classes: int = 6,
        in_chans: int | None = 3,
        image_size: int | None = None,
        data_inputs: dict[str, Any] | None = None,
        vocab_size: int = 25,
        encoder: str = "baseline_tinycnn",
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_checkpoint: str | None = None,
        encoder_epochs: int = 4,
        sentence_classifier_checkpoint: str | None = None,
        sentence_classifier_epochs: int = 4,
        sentence_classifier_dropout: float = 0.75,
        sentence_classifier_kwargs: dict[str, Any] | None = None,
        init_checkpoint: str | None = None,
        relevance_weight: float = 1.0,
        discriminative_weight: float = 0.0,
        hidden: int = 256,
        max_len: int = 18,
        train_encoder: bool = False,
        class_features: str = "embedding",
        description_checkpoint: str | None = None,
        aux_lr: float = 2e-3,
        captions_key: str = "captions",
        start_token: int = 1,
        end_token: int = 2,
        vocabulary: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if vocabulary is not None and len(vocabulary) > vocab_size:
            raise ValueError(f"vocabulary holds {len(vocabulary)} words for vocab_size={vocab_size}.")
        super().__init__(num_classes=num_classes, in_chans=in_chans, image_size=image_size, data_inputs=data_inputs,
                         **kwargs)
        if variant in ("explanation", "explanation-dis") and discriminative_weight == 0:
            rank_zero_warn(f"variant={variant!r} with discriminative_weight=0 has no discriminative loss: it trains "
                           f"as {'explanation-label' if variant == 'explanation' else 'description'} does (the "
                           f"paper's weight is 0.2, configs/textual/{variant.replace('-', '_')}.yaml).")
        classifier_kwargs = dict(sentence_classifier_kwargs or {})
        for key in ("num_classes", "vocab_size", "dropout"):  # System arguments: one value each
            if key in classifier_kwargs:
                raise ValueError(f"sentence_classifier_kwargs gives {key}={classifier_kwargs[key]!r}: it is the "
                                 f"System's {'sentence_classifier_dropout' if key == 'dropout' else key}; set it "
                                 f"there and drop it from sentence_classifier_kwargs.")
        self.sentence_classifier = create_model("textual_sentence_classifier", num_classes=num_classes,
                                                vocab_size=vocab_size, dropout=sentence_classifier_dropout,
                                                **classifier_kwargs).requires_grad_(False)
        self.register_buffer("image_encoder_ready", torch.tensor(False))
        self.register_buffer("sentence_classifier_ready", torch.tensor(False))
        # (setting, file, its datamodule's hyperparameters, its class names) of the stage read: `check_data`
        # compares them with this run's data
        self._stage_data: list[tuple[str, str, dict[str, Any] | None, list[str] | None]] = []
        if init_checkpoint is not None and not weights_will_be_replaced():  # else the restore replaces it
            self._load_stage(init_checkpoint)
        self.add_metric("cider_d", CIDErD(end_token=end_token, start_token=start_token))
        self.add_metric("class_relevance", ClassRelevance(end_token=end_token, start_token=start_token), log_prefix="")
        self.add_metric("attributes", AttributeMention(), log_prefix="")
        self.add_metric("acc", MulticlassAccuracy(num_classes, average="micro"))
        self.add_metric("bleu_4", BLEUScore(n_gram=4))
        self.add_metric("rouge_l", RougeL())

    # ------------------------------------------------------------------------------------------- family hooks
    def build_model(self) -> nn.Module:
        """`textual_<variant>` from the registry. Its name and arguments are recorded in the hyperparameters (as
        every System's), so a checkpoint names its model (`zoo.load_checkpoint`, compatibility checks).

        The arguments are the linked ones (this System's `vocab_size`, `encoder`, `hidden`, ...; `class_dim` 64, or
        the description model's hidden size for `class_features="description"`) under the user's `model_kwargs`,
        which win, as the base System documents: `{feature_dim: 1000, class_dim: 1000, embed_dim: 1000}` sizes the
        model (`ExplanationModel`); an unknown key is refused by name (`zoo.create_model`). A key that is also a
        System argument (`hidden`, `max_len`, ...) takes the System's value (said where they differ, unless the
        model_kwargs are a checkpoint's, `load_from_checkpoint` given none: they hold the linked values it was
        trained with, which the System's arguments given at load override)."""
        hp = self.hparams
        given = dict(hp.get("model_kwargs") or {})
        recorded = _RECORDED_MODEL_KWARGS.get()
        for key in LINKED_ARGUMENTS:  # both a System argument and a model one: the System's wins (a checkpoint's
            # model_kwargs record the linked values, which `load_from_checkpoint(path, max_len=30)` overrides)
            own = hp.get(key)
            if key in given and given[key] != own and (given[key] or own) and not recorded:  # {}: None
                rank_zero_warn(f"model_kwargs gives {key}={given[key]!r} and the System's {key} is {own!r}: the "
                               f"System's is used (set it as --model.init_args.{key}, TextualSystem({key}=...)).")
            given.pop(key, None)
        if "class_dim" in given:  # the user's size (or a checkpoint's saved one: no description file read)
            class_dim = given["class_dim"]
        elif hp.class_features == "description":  # the table holds description-model states: their size
            class_dim = (read_checkpoint(hp.description_checkpoint)["hyper_parameters"].get("hidden", hp.hidden)
                         if hp.description_checkpoint is not None else hp.hidden)
        else:
            class_dim = 64
        encoder_kwargs = hp.get("encoder_kwargs")  # only when given: model_kwargs as before for every other run
        vocabulary = hp.get("vocabulary")  # only when known: model_kwargs as before for every other run
        linked = dict(vocab_size=hp.vocab_size, encoder=hp.encoder, hidden=hp.hidden, max_len=hp.max_len,
                      train_encoder=hp.train_encoder, class_features=hp.class_features, class_dim=class_dim,
                      **({"encoder_kwargs": dict(encoder_kwargs)} if encoder_kwargs else {}),
                      **({"vocabulary": list(vocabulary)} if vocabulary is not None else {}))
        hp.update(model_name=variant_model_name(hp.variant), model_kwargs={**linked, **given})  # the user's win
        return super().build_model()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """ZooSystem's, with the checkpoint's `model_kwargs` known as its record where none are given: a System
        argument given here (`max_len=30`) overrides their linked copy without the warning `build_model` gives a
        user's model_kwargs that disagree."""
        token = _RECORDED_MODEL_KWARGS.set("model_kwargs" not in kwargs)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _RECORDED_MODEL_KWARGS.reset(token)

    def default_loss(self) -> nn.Module:
        from losses.textual import TextualLoss

        return TextualLoss(self.hparams.relevance_weight, self.hparams.discriminative_weight)

    def auxiliaries(self) -> list[Auxiliary]:
        hp = self.hparams
        classifier = Auxiliary("sentence_classifier", functools.partial(
            sentence_classifier_batch_loss, captions_key=hp.captions_key, target_key=self.target_key,
            start_token=hp.start_token), hp.sentence_classifier_epochs, hp.aux_lr, hp.sentence_classifier_checkpoint)
        if not self.model.uses_image:  # definition: no image, no encoder to prepare
            return [classifier]
        encoder = Auxiliary("model.image_encoder", functools.partial(
            encoder_batch_loss, input_key=self.input_key, target_key=self.target_key), hp.encoder_epochs, hp.aux_lr,
            hp.encoder_checkpoint, trainable_after=hp.train_encoder)
        # the sentence classifier first: it reads the sentences, so data without them (or with ids past vocab_size)
        # fails on its first batch, not after the encoder's epochs. Each helper trains inside `isolate_rng` from the
        # run's random state, so the order changes no weight.
        return [classifier, encoder]

    def forward_batch(self, batch: Any, stage: str) -> dict[str, Any]:
        images, labels = batch_field(batch, self.input_key), batch_field(batch, self.target_key)
        captions = batch_captions(batch, self.hparams.captions_key)  # (B, R, L)
        span = ids_out_of_range(captions, None, self.hparams.vocab_size - 1)  # CPU only: free of device syncs
        if span is not None:
            raise ValueError(f"captions hold token id {span[1]} >= vocab_size {self.hparams.vocab_size}.")
        self.defer_check(starts_with_bos(captions, self.hparams.start_token),  # read with the loss check on a GPU
                         no_bos_message(self.hparams.captions_key, self.hparams.start_token))
        check_class_ids(labels, self.model_classes, self.hparams.num_classes)  # before the class embedding reads them
        if stage != "train":
            sentences, log_probs = self.model.explain(images, labels, mode="greedy")
            return {"images": images, "labels": labels, "references": captions, "sentences": sentences,
                    "sentence_log_probs": log_probs, "sentence_logits": self.sentence_classifier(sentences)["logits"]}
        # One reference per image, uniform among its non-empty rows (random keys, empty rows keyed -1; an image
        # without any sentence gets row 0, all padding, which the relevance loss ignores). No host sync: no
        # torch.multinomial, whose input checks read the device.
        keys = torch.rand(captions.shape[:2], device=captions.device).masked_fill(~reference_rows(captions), -1.0)
        pick = keys.argmax(1)  # (B,)
        tokens = captions[torch.arange(len(captions), device=captions.device), pick]  # (B, L) one reference each
        sample = self.loss.samples_needed and self._stage_sums("loss_discriminative")
        out = {**self.model(images, labels, tokens, sample=sample), "tokens": tokens}  # sampling reads no device
        if sample:
            out["reward"] = self.sentence_classifier.true_class_probability(out["samples"], labels)
        return out

    def compute_loss(self, out: dict[str, Any], batch: Any, stage: str) -> dict[str, torch.Tensor]:
        return super().compute_loss(out, batch, stage) if stage == "train" else {}  # evaluation: metrics only

    def update_metrics(self, out: dict[str, Any], batch: Any, stage: str) -> None:
        if stage == "train":
            if "reward" in out:
                self.log("train/reward", out["reward"].mean(), on_step=True, on_epoch=True,
                         batch_size=len(out["reward"]))
            return
        sentences, references, labels = out["sentences"], out["references"], out["labels"]
        index = batch.get("index") if isinstance(batch, dict) else None  # (B,) dataset indices: pools in dataset order
        self.log_metric(stage, "cider_d", sentences, references, None, index)
        self.log_metric(stage, "class_relevance", sentences, references, labels, index)
        self.log_metric(stage, "acc", out["sentence_logits"], labels, prog_bar=True)
        texts, refs = reference_texts(as_text(sentences, self.hparams.end_token, self.hparams.start_token),
                                      as_text(references, self.hparams.end_token, self.hparams.start_token))
        self.log_metric(stage, "bleu_4", texts, refs)  # empty references (all-padding rows) dropped
        self.log_metric(stage, "rouge_l", texts, refs)
        mentioned = getattr(self.trainer.datamodule, "mentioned", None) if self._trainer is not None else None
        if mentioned is not None and "part_types" in batch and "distractor_types" in batch:
            self.log_metric(stage, "attributes", mentioned(sentences), batch["part_types"], batch["distractor_types"])

    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Each image's greedy explanation as words, and the sentence classifier's class probabilities of it as the
        prediction (the class the sentence argues for; `zoo.cli.predict.PredictionWriter` writes predictions.csv).
        The sentence explains the batch's label, as in validation; without labels, the image encoder's class."""
        images = batch_field(batch, self.input_key)
        labels = self._explained_classes(batch, images)  # (B,)
        sentences, _ = self.model.explain(images, labels, mode="greedy")  # (B, T)
        probs = self.sentence_classifier(sentences)["logits"].float().softmax(-1)  # (B, classes)
        decode = self.sentence_decoder()
        columns: dict[str, list[Any]] = {"explanation": [decode(sentence) for sentence in sentences.cpu()]}
        if self.model.uses_class:
            columns["explained_class"] = [self.class_names[c] for c in labels.tolist()]
        return {"probs": probs, "pred": probs.argmax(-1), "columns": columns,
                **({"index": batch["index"]} if "index" in batch else {})}

    def _explained_classes(self, batch: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
        """(B,) the classes the sentences explain: the batch's labels, else the image encoder's prediction."""
        if self.target_key in batch:
            labels = batch[self.target_key]
            check_class_ids(labels, self.model_classes, self.hparams.num_classes)
            return labels
        if not self.model.uses_image:
            raise ValueError(f"variant {self.hparams.variant!r} explains a given class and reads no image: the predict "
                             f"batches need labels (batch[{self.target_key!r}]).")
        return self.model.image_encoder(images)["logits"].argmax(-1)

    def sentence_decoder(self) -> Callable[[torch.Tensor], str]:
        """tokens (L,) -> words: the datamodule's `decode` when it has one, else the recorded `vocabulary`, else the
        token ids as numbers (up to <eos>; padding and <bos> dropped)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        decode = getattr(datamodule, "decode", None)
        if decode is not None:
            return decode
        vocabulary, hp = self.hparams.get("vocabulary"), self.hparams
        return lambda tokens: " ".join(decode_tokens(tokens, vocabulary, end_token=hp.end_token,
                                                     skip=(0, hp.start_token)))

    def explanation_report(self, datamodule: Any, settings: dict[str, Any]) -> None:
        """The explanations are sentences, scored by the validation metrics; post-hoc image explainers do not
        apply to a sentence generator."""
        return None

    def _stage_sums(self, term: str) -> bool:
        wanted = self.schedule.current.losses
        return wanted is None or term in wanted

    # ------------------------------------------------------------------------------------ fit start, checkpoints
    def setup(self, stage: str) -> None:
        """Before DDP wraps the model and the optimiser is built: the layers the variant does not read frozen again
        (`ExplanationModel.freeze_unread`): preparing a fine-tuned encoder (`train_encoder`) left its classifier
        head trainable, which the generator never reads (DDP's unused-parameter error)."""
        super().setup(stage)
        if stage == "fit":
            self.model.freeze_unread()

    def on_fit_start(self) -> None:
        self.check_data(self.trainer.datamodule)
        super().on_fit_start()  # auxiliaries
        model = self.model
        table_wanted = model.uses_class and model.class_features == "description" and not model.class_table_ready
        if table_wanted and self.hparams.description_checkpoint is None:
            raise ValueError("class_features='description' needs description_checkpoint (a trained description "
                             "model, configs/textual/description.yaml) or an init_checkpoint that has the table.")
        self.check_helpers_ready()
        if table_wanted:
            self._fill_class_table(self.hparams.description_checkpoint)

    def check_helpers_ready(self) -> None:
        """After the auxiliaries were loaded, taken from the stage or trained (and a resumed fit's restored): refuse,
        by name, a sentence classifier that is none of these (its probability of the true class is the REINFORCE
        reward and `val/acc`, the checkpoint monitor: an untrained one scores about 1/classes for every sentence),
        and a frozen image encoder never trained (`train_encoder` off) that the variant reads. Not in __init__: an
        `init_checkpoint` supplies both with 0 epochs. A CheckpointError (weights neither trained nor loaded):
        train.py says it in one line."""
        hp = self.hparams
        if not bool(self.sentence_classifier_ready):
            raise CheckpointError(
                f"sentence_classifier_epochs={hp.sentence_classifier_epochs} and no sentence_classifier_checkpoint, "
                f"nor an init_checkpoint that holds a trained one: the sentence classifier (the discriminative reward "
                f"and val/acc) would be neither trained nor loaded. Set --model.init_args.sentence_classifier_epochs "
                f"to a number of epochs > 0 (the configs use 4), or give "
                f"--model.init_args.sentence_classifier_checkpoint (a textual run's checkpoint), or "
                f"--model.init_args.init_checkpoint (a stage-1 run's).")
        if self.model.uses_image and not bool(self.image_encoder_ready) and not hp.train_encoder:
            raise CheckpointError(
                f"encoder_epochs={hp.encoder_epochs}, no encoder_checkpoint, nor an init_checkpoint that holds a "
                f"trained one, and train_encoder=False: variant {hp.variant!r} would read the image through a frozen, "
                f"randomly initialised encoder. Set --model.init_args.encoder_epochs to a number of epochs > 0 (the "
                f"configs use 4), or give --model.init_args.encoder_checkpoint (a classifier's or a textual run's "
                f"checkpoint) or --model.init_args.init_checkpoint (a stage-1 run's), or train it with the generator "
                f"(--model.init_args.train_encoder=true).")

    def check_data(self, datamodule: Any) -> None:
        """Before any training (the auxiliaries included), by name: data without reference sentences (where the
        datamodule looked for them, `describe_sentences`), a `vocab_size` below the datamodule's `vocabulary`, a
        vocabulary other than the one the weights were trained with. Records the vocabulary (`vocabulary`, in the
        hyperparameters and the model's `model_kwargs`) so that checkpoints and exports decode their sentences."""
        self.check_stage_data(datamodule)
        samples = getattr(datamodule, "split_samples", None)
        if samples is not None and self.hparams.captions_key not in samples("train")[0]:
            where = getattr(datamodule, "describe_sentences", lambda: "")()
            raise ValueError(f"{type(datamodule).__name__} gives no {self.hparams.captions_key!r}"
                             + (f": {where}" if where else "") + f". {SENTENCES_HELP}")
        vocabulary = getattr(datamodule, "vocabulary", None)
        if not vocabulary:  # none (ids as numbers), or none read (no sentences)
            return
        vocabulary, hp = [str(word) for word in vocabulary], self.hparams
        if len(vocabulary) > hp.vocab_size:
            raise ValueError(f"vocab_size={hp.vocab_size} is below the data's vocabulary of {len(vocabulary)} words: "
                             f"set --model.init_args.vocab_size={len(vocabulary)}.")
        self._settle_vocabulary(hp.get("vocabulary"), vocabulary)

    def check_stage_data(self, datamodule: Any) -> None:
        """Refuse, by name, a stage-2 run on data with other classes or inputs than the stage it starts from
        (`init_checkpoint`, `description_checkpoint`): the stage's image encoder, sentence classifier (the reward
        and `val/acc`) and class embedding would be kept for classes they never saw (another `world_seed` draws
        other part types for every class), silently. Compared: the data settings both the stage's checkpoint and
        this run's datamodule name, but `STAGE_DATA_FREE` (file places, loading, sample counts, batch size, split
        seed); and the class names in class-id order. A stage saved without its datamodule is not compared."""
        from zoo.engine.auxiliary import saved_settings

        hp, model = self.hparams, self.model
        stages = list(self._stage_data)
        path = hp.get("description_checkpoint")
        if (path is not None and model.uses_class and model.class_features == "description"
                and not bool(model.class_table_ready) and not weights_will_be_replaced() and Path(path).is_file()):
            checkpoint = read_checkpoint(path)
            stages.append(("description_checkpoint", path, checkpoint.get("datamodule_hyper_parameters"),
                           (checkpoint.get("hyper_parameters") or {}).get("class_names")))
        if not stages:
            return
        given = saved_settings(datamodule)
        for key in ("mean", "std"):  # as it normalises (`mean: pretrained` resolved by then, or dropped)
            if hasattr(datamodule, key):
                given[key] = getattr(datamodule, key)
        if given.get("mean") == "pretrained":
            given = {k: v for k, v in given.items() if k not in ("mean", "std")}
        names = hp.get("class_names") or getattr(datamodule, "class_names", None)
        renumbered = type(datamodule).__name__ == "CUB200DataModule"  # CUB's old "0".."C-1" class names
        for setting, path, held, class_names in stages:
            held = self._resolved_normalization(held or {})
            source = f"{setting} {path!r} (an earlier stage)"
            hint = (f"Give this run the stage's data settings (as in its run's config.yaml), or train the stage on "
                    f"this data first (its image encoder and sentence classifier are kept). The data's "
                    f"{', '.join(STAGE_DATA_FREE)} may differ.")
            changed = [key for key in (held or {}) if key in given and key not in STAGE_DATA_FREE
                       and not _same_setting(key, held[key], given[key])]
            if changed:
                lines = "; ".join(f"{key}: {_shown(held[key])} in the stage, {_shown(given[key])} here"
                                  for key in changed)
                raise CheckpointError(f"{source} was trained on other data than this run's ({lines}): its image "
                                      f"encoder, sentence classifier and class features would be kept for other "
                                      f"classes or inputs. {hint}")
            check_class_names(class_names, names, source, hint, renumbered=renumbered)

    def _resolved_normalization(self, held: dict[str, Any]) -> dict[str, Any]:
        """A stage's data settings with `mean: pretrained` resolved with this System's image encoder (the stage's
        own: the stage check requires it), as `zoo.weights.resolved_normalization` resolves a checkpoint's."""
        from zoo.backbones import Backbone
        from zoo.weights import resolved_normalization

        backbone = next((m for m in self.modules() if isinstance(m, Backbone)), None)
        return resolved_normalization(held, getattr(backbone, "name", None), self.hparams.get("in_chans") or 3)

    def _settle_vocabulary(self, trained: list[str] | None, data: list[Any] | None) -> None:
        """Record the words the weights were trained with (`trained`), else the data's; data whose words differ
        from the trained ones is refused by name (its token ids would mean other words)."""
        data = [str(word) for word in data] if data else None
        if trained is not None and data is not None and list(trained) != data:
            raise CheckpointError(vocabulary_mismatch(list(trained), data))
        words = list(trained) if trained is not None else data
        if words is not None:
            self._record_vocabulary(words)

    def _record_vocabulary(self, words: list[str]) -> None:
        """The words of the token ids, in the hyperparameters, the model's `model_kwargs` (an export's config.json)
        and the model."""
        self.hparams["vocabulary"] = words
        self.hparams.model_kwargs["vocabulary"] = words
        self.model.vocabulary = words

    def _load_stage(self, path: str) -> None:
        """An earlier stage's TextualSystem checkpoint: every model and sentence-classifier weight must fit. An
        auxiliary given its own checkpoint is not taken from the stage (nor marked ready): its file wins. A missing
        file is named as the stage-1 run not trained yet (what config trains it)."""
        if not Path(path).exists():
            stage_one = STAGE_ONE_CONFIGS.get(self.hparams.variant)
            first = (f"configs/textual/{stage_one}.yaml first (train.py fit --config configs/textual/"
                     f"{stage_one}.yaml)" if stage_one is not None else "the stage this variant starts from first")
            raise CheckpointError(
                f"init_checkpoint {path!r} (the stage-1 model variant {self.hparams.variant!r} starts from) does not "
                f"exist: train {first}, or name its checkpoint with "
                f"--model.init_args.init_checkpoint=<run>/checkpoints/last.ckpt; or train this variant from scratch "
                f"with --model.init_args.init_checkpoint=null (the config's header shows the whole chain in one run "
                f"with stages).")
        checkpoint = read_checkpoint(path)
        self._stage_data.append(("init_checkpoint", path, checkpoint.get("datamodule_hyper_parameters"),
                                 (checkpoint.get("hyper_parameters") or {}).get("class_names")))
        state = checkpoint["state_dict"]
        own = self.state_dict()
        hp = self.hparams
        given = (("model.image_encoder.", "image_encoder_ready") if hp.encoder_checkpoint is not None else ()) + (
            ("sentence_classifier.", "sentence_classifier_ready") if hp.sentence_classifier_checkpoint is not None
            else ())
        wanted = [k for k in own if k.startswith(("model.", "sentence_classifier.", "image_encoder_ready",
                                                  "sentence_classifier_ready")) and not k.startswith(given)]
        missing = [k for k in wanted if k not in state or state[k].shape != own[k].shape]
        sizes = size_differences(checkpoint["hyper_parameters"], hp, skip=("class_dim",))
        if missing and sizes:
            raise CheckpointError(f"{path!r} (stage 1) was built with other sizes than this run: {sizes}. Give this "
                                  f"run the stage's sizes (--model.init_args.model_kwargs / "
                                  f"sentence_classifier_kwargs as in its config.yaml).")
        settings = stage_setting_differences(checkpoint["hyper_parameters"], hp) if missing else []
        if settings:
            shown = "; ".join(f"{key}={saved!r} in the stage, {here!r} here" for key, saved, here in settings)
            flags = " ".join(f"--{'data' if key == 'num_classes' else 'model'}.init_args.{key}={saved}"
                             for key, saved, _ in settings)  # the CLI links num_classes from the data
            raise CheckpointError(f"{path!r} (stage 1) was built with other settings than this run: {shown}. Give "
                                  f"this run the stage's ({flags}, as in its run's config.yaml), or train the stage "
                                  f"with this run's.")
        if missing:
            inputs = VARIANTS.get(checkpoint["hyper_parameters"].get("variant")) != VARIANTS[hp.variant]
            raise CheckpointError(f"{path!r} does not fit variant {self.hparams.variant!r}: missing or mis-shaped "
                                  f"{missing[:8]}" + (" (a stage must keep the image/class inputs of the one it "
                                                      "starts from)." if inputs else "."))
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        words = checkpoint["hyper_parameters"].get("vocabulary")
        if words is not None and hp.get("vocabulary") is None:  # the stage's words: `check_data` holds the data to them
            self._record_vocabulary(list(words))

    @torch.no_grad()
    def _fill_class_table(self, path: str) -> None:
        """The paper's class feature: per class, the mean over its training sentences of the description model's
        LSTM2 state averaged over each sentence's words (teacher forcing on the sentence, with its image).
        Sums and counts are all-reduced, so every rank holds the table of the whole training set."""
        hp = read_checkpoint(path)["hyper_parameters"]
        if hp.get("variant") != "description":
            raise CheckpointError(f"description_checkpoint {path!r} holds variant {hp.get('variant')!r}; the class "
                                  f"table needs a description model (configs/textual/description.yaml).")
        describer = create_model_for_data(hp["model_name"], hp["num_classes"], hp.get("in_chans"),
                                          hp.get("image_size"), hp.get("data_inputs"), hp.get("model_kwargs"))
        load_module_weights(describer, path, "model.", "description model")
        describer.to(self.device).eval()
        table = self.model.class_table
        width = describer.generator.feature_lstm.hidden_size
        if width != table.shape[1]:
            raise CheckpointError(f"description_checkpoint {path!r} holds a description model of hidden size {width}; "
                                  f"the class table is built with class_dim={table.shape[1]}: drop class_dim from "
                                  f"model_kwargs (it is then the description model's size) or set it to {width}.")
        sums, counts = torch.zeros_like(table), torch.zeros(len(table), device=table.device)
        for batch in self.trainer.datamodule.train_dataloader():
            images = batch[self.input_key].to(self.device)
            labels = batch[self.target_key].to(self.device)
            captions = batch[self.hparams.captions_key].to(self.device)  # (B, R, L)
            references = captions.shape[1]
            feature = describer.features(images, labels).repeat_interleave(references, 0)  # (B*R, F)
            tokens, labels = captions.flatten(0, 1), labels.repeat_interleave(references)  # (B*R, L), (B*R,)
            states = describer.generator.hidden_states(feature, tokens).float()  # (B*R, L-1, H)
            words = (tokens[:, 1:] != 0).float()[..., None]  # (B*R, L-1, 1): the predicted words and <eos>
            sentence = (states * words).sum(1) / words.sum(1).clamp(min=1)  # (B*R, H)
            present = (words.sum((1, 2)) > 0).float()  # (B*R,) an all-padding reference row is no sentence
            sums.index_add_(0, labels, sentence)
            counts += torch.bincount(labels, weights=present, minlength=len(table)).float()
        all_reduce_(sums), all_reduce_(counts)
        if (counts == 0).any():
            raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no training sentences: "
                             f"their description feature is undefined.")
        table.copy_(sums / counts[:, None])
        self.model.class_table_ready.fill_(True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, by name, a checkpoint of another variant, class count, vocabulary or encoder."""
        saved = checkpoint.get("hyper_parameters") or {}
        for key in COMPATIBLE_KEYS:
            if key in saved and saved[key] != self.hparams[key]:
                raise CheckpointError(f"The checkpoint holds an explanation model with {key}={saved[key]!r}; this run "
                                      f"builds {key}={self.hparams[key]!r}.")
        sizes = size_differences(saved, self.hparams)
        if sizes:  # before torch's size-mismatch traceback
            raise CheckpointError(f"The checkpoint holds an explanation model of other sizes than this run builds: "
                                  f"{sizes}. A run written before model_kwargs sizes took effect (2026-12-05) was "
                                  f"built with the defaults, whatever its config said: drop those sizes from "
                                  f"model_kwargs / sentence_classifier_kwargs to resume it.")
        super().on_load_checkpoint(checkpoint)
        if saved.get("vocabulary") is not None:  # the weights' words, for decoding and later checkpoints
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self._settle_vocabulary(saved["vocabulary"], getattr(datamodule, "vocabulary", None))


# System arguments that size or choose a stage's weights (`stage_setting_differences`)
STAGE_SETTINGS = ("hidden", "vocab_size", "num_classes", "encoder")


def stage_setting_differences(saved: dict[str, Any], hparams: Any) -> list[tuple[str, Any, Any]]:
    """(key, the stage's value, this run's) for each `STAGE_SETTINGS` System argument a stage-1 checkpoint's
    hyperparameters `saved` were built with that differs from `hparams` (a stage trained with hidden=16 read by the
    stage-2 config's default 256: its weights do not fit, which the weight names alone did not say). Read only where
    weights do not fit."""
    return [(key, saved[key], hparams.get(key)) for key in STAGE_SETTINGS
            if key in saved and saved[key] != hparams.get(key) and (saved[key] or hparams.get(key))]


def size_differences(saved: dict[str, Any], hparams: Any, skip: tuple[str, ...] = ()) -> str:
    """"key: saved vs here; ..." for the sizes (`SIZE_KEYS` of model_kwargs, the sentence classifier's
    `sentence_classifier_kwargs`) a checkpoint's hyperparameters `saved` were built with and `hparams` build; a size
    absent from either is the model's default (what a checkpoint written before sizes took effect was built with).
    `skip`: sizes that may differ (a stage-2 class feature of another size than its stage 1's)."""
    import inspect

    from zoo.textual.model import ExplanationModel, SentenceClassifier

    def sizes(model_kwargs: Any, classifier_kwargs: Any) -> dict[str, Any]:
        model_kwargs, classifier_kwargs = dict(model_kwargs or {}), dict(classifier_kwargs or {})
        model, classifier = (inspect.signature(c).parameters for c in (ExplanationModel, SentenceClassifier))
        return {**{key: model_kwargs.get(key, model[key].default) for key in SIZE_KEYS},
                **{f"sentence_classifier_kwargs.{key}": classifier_kwargs.get(key, classifier[key].default)
                   for key in ("embed_dim", "hidden")}}

    held = sizes(saved.get("model_kwargs"), saved.get("sentence_classifier_kwargs"))
    here = sizes(hparams.get("model_kwargs"), hparams.get("sentence_classifier_kwargs"))
    return "; ".join(f"{key}: {held[key]} vs {here[key]}" for key in held if held[key] != here[key] and key not in skip)


def vocabulary_mismatch(trained: list[str], data: list[str]) -> str:
    """The error for weights trained on another vocabulary than the data's: token ids would mean other words."""
    first = next((i for i, (a, b) in enumerate(zip(trained, data)) if a != b), min(len(trained), len(data)))
    return (f"The explanation model was trained with a vocabulary of {len(trained)} words; the data's has "
            f"{len(data)} and differs from token id {first} on ({trained[first:first + 3]} vs "
            f"{data[first:first + 3]}): its sentences would decode to other words. Use the data (sentences, "
            f"max_vocab, val_fraction) the model was trained on.")
