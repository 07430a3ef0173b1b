"""Textual explanation building blocks: decoding stops at the end token, batched decoding equals one-by-one
decoding (greedy and beam), loss masking, and the REINFORCE gradient's sign on a toy reward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from losses.textual import DiscriminativeLoss, RelevanceLoss
from zoo.textual.model import FactoredLSTMGenerator, SentenceClassifier

PAD, BOS, EOS = 0, 1, 2


def generator(seed: int = 0, **kw) -> FactoredLSTMGenerator:
    torch.manual_seed(seed)
    model = FactoredLSTMGenerator(12, 5, embed_dim=8, hidden=16, max_len=9, **kw).eval()
    with torch.no_grad():  # make the end token likely after a few words, so sentences end at different steps
        model.out.bias[EOS] += 1.5
    return model


def test_decoding_stops_at_the_end_token() -> None:
    model = generator()
    features = torch.randn(16, 5)
    for mode in ("greedy", "sample", "beam"):
        tokens, log_probs = model.decode(features, mode=mode)
        assert tokens.shape == (16, 9) and log_probs.shape == (16, 9)
        for row, lp in zip(tokens.tolist(), log_probs):
            if EOS in row:
                end = row.index(EOS)
                assert all(t == PAD for t in row[end + 1:]) and (lp[end + 1:] == 0).all(), mode
            assert BOS not in row
        assert (tokens == EOS).any(), mode  # the test is not vacuous


def test_batched_decoding_equals_one_by_one() -> None:
    model = generator(1)
    features = torch.randn(6, 5)
    for mode in ("greedy", "beam"):
        batched, batched_lp = model.decode(features, mode=mode)
        singles = [model.decode(features[i:i + 1], mode=mode) for i in range(6)]
        assert torch.equal(batched, torch.cat([s[0] for s in singles])), mode
        assert torch.allclose(batched_lp, torch.cat([s[1] for s in singles]), atol=1e-5), mode


@pytest.mark.parametrize("early_stop", [True, False])
def test_sampling_with_a_graph_scores_the_words_as_the_step_loop_does(early_stop: bool) -> None:
    """REINFORCE's sampling (grad enabled) draws the words without a graph and scores them in one teacher-forced
    pass: the same words as the step-by-step loop from the same random state, and up to float rounding the same
    per-word log-probabilities (0 after <eos>) and the same gradient of their sum."""
    model = generator(3).train()
    features = torch.randn(16, 5, requires_grad=True)

    def sample(loop: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        features.grad = None
        torch.manual_seed(7)
        tokens, log_probs = (model._decode_loop(features, "sample", early_stop) if loop
                             else model.decode(features, "sample", early_stop=early_stop))
        (log_probs.sum(1) * torch.linspace(-1, 1, 16)).sum().backward()  # a REINFORCE-like weighted sum
        return tokens, log_probs.detach(), [p.grad.clone() for p in (features, *model.parameters())]

    loop_tokens, loop_log_probs, loop_grads = sample(loop=True)
    tokens, log_probs, grads = sample(loop=False)
    assert torch.equal(tokens, loop_tokens) and (tokens == EOS).any() and (tokens == PAD).any()
    torch.testing.assert_close(log_probs, loop_log_probs, rtol=1e-5, atol=1e-6)
    for grad, loop_grad in zip(grads, loop_grads):
        torch.testing.assert_close(grad, loop_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reference_length", [6, 14])  # shorter and longer than max_len + 1 = 10
def test_one_pass_scores_the_reference_and_the_samples_as_two_passes_do(reference_length: int) -> None:
    """`forward(..., sample=True)` (the image encoded once; teacher forcing and the sampled sentences in one LSTM
    pass over 2B sentences) against teacher forcing plus `explain(mode="sample", early_stop=False)`: the same
    words from the same random state, and up to float rounding the same logits, log-probabilities and gradients."""
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model("textual_explanation", num_classes=3, vocab_size=12, max_len=9, hidden=16,
                             feature_dim=8, class_dim=4).train()
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 3, (8,))
    tokens = torch.randint(3, 12, (8, reference_length))
    tokens[:, 0], tokens[:, -2:] = BOS, torch.tensor([EOS, PAD])

    def run(one_pass: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(5)
        if one_pass:
            out = model(images, labels, tokens, sample=True)
        else:
            out = model(images, labels, tokens)
            out["samples"], out["sample_log_probs"] = model.explain(images, labels, mode="sample", early_stop=False)
        weights = torch.linspace(-1, 1, 8)
        (out["word_logits"].square().mean() + (out["sample_log_probs"].sum(1) * weights).sum()).backward()
        return ({k: v.detach() for k, v in out.items()},
                [p.grad.clone() for p in model.parameters() if p.grad is not None])

    two, two_grads = run(one_pass=False)
    one, one_grads = run(one_pass=True)
    assert one["word_logits"].shape == (8, reference_length - 1, 12)
    assert torch.equal(one["samples"], two["samples"]) and (one["samples"] == PAD).any()
    torch.testing.assert_close(one["word_logits"], two["word_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one["sample_log_probs"], two["sample_log_probs"], rtol=1e-5, atol=1e-6)
    assert len(one_grads) == len(two_grads) > 4
    for grad, expected in zip(one_grads, two_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("mode", ["sample", "greedy"])
def test_decoding_draws_what_a_step_by_step_multinomial_loop_draws(mode: str, early_stop: bool) -> None:
    """The decoder's own draw (softmax, exponential noise, argmax; one fused LSTM cell per layer; words after <eos>
    masked at the end without early stop) against the plain loop: `step`'s log-probabilities, `torch.multinomial`,
    padding fed after each sentence's end. From the same random state: the same words and log-probabilities."""
    torch.manual_seed(0)
    model = FactoredLSTMGenerator(12, 5, embed_dim=8, hidden=16, max_len=9).eval()
    with torch.no_grad():  # weights large enough that greedy words depend on the state, and some sentences end
        for p in model.parameters():
            p.mul_(20)
        model.out.bias[EOS] += 2.0
    features = torch.randn(32, 5)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        token, done, state = torch.full((32,), BOS), torch.zeros(32, dtype=torch.bool), None
        tokens, log_probs = [], []
        for _ in range(model.max_len):
            step_log_probs, state = model.step(features, token, state)
            token = (torch.multinomial(step_log_probs.exp(), 1)[:, 0] if mode == "sample"
                     else step_log_probs.argmax(-1)).masked_fill(done, PAD)
            log_probs.append(step_log_probs.gather(1, token[:, None])[:, 0].masked_fill(done, 0.0))
            tokens.append(token)
            done = done | (token == EOS)
        return torch.stack(tokens, 1), torch.stack(log_probs, 1)

    torch.manual_seed(11)
    expected_tokens, expected_log_probs = reference()
    torch.manual_seed(11)
    with torch.no_grad():
        tokens, log_probs = model.decode(features, mode, early_stop=early_stop)
    assert torch.equal(tokens, expected_tokens)
    assert (tokens == EOS).any() and (tokens == PAD).any() and len(set(tokens.flatten().tolist())) > 4
    torch.testing.assert_close(log_probs, expected_log_probs, rtol=1e-5, atol=1e-6)


def test_beam_finds_at_least_the_greedy_likelihood() -> None:
    model = generator(2)
    features = torch.randn(8, 5)
    _, greedy = model.decode(features, mode="greedy")
    _, beam = model.decode(features, mode="beam", beam_size=4)
    assert (beam.sum(1) >= greedy.sum(1) - 1e-5).all()


def test_relevance_loss_ignores_padding() -> None:
    logits = torch.randn(2, 4, 12)
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD]])
    loss = RelevanceLoss()({"word_logits": logits}, {"tokens": tokens})["loss_relevance"]
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, EOS), (1, 0, 7), (1, 1, EOS)]
    expected = -sum(logits[b, t].log_softmax(-1)[w] for b, t, w in targets) / len(targets)
    assert torch.allclose(loss, expected, atol=1e-6)
    changed = logits.clone()
    changed[1, 2:] = 100.0  # positions whose target is padding: no effect
    assert torch.allclose(RelevanceLoss()({"word_logits": changed}, {"tokens": tokens})["loss_relevance"], loss)


def test_reinforce_gradient_raises_rewarded_sentences() -> None:
    """Two sampled sentences; the rewarded one's log-probability must get a positive push (negative gradient of the
    loss), the other's a negative push, once the baseline sits between their rewards."""
    log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    loss_module = DiscriminativeLoss(weight=1.0).train()
    terms = loss_module({"reward": torch.tensor([0.9, 0.1]), "sample_log_probs": log_probs}, {})
    terms["loss_discriminative"].backward()
    assert loss_module.baseline.item() == torch.tensor(0.5).item()
    assert (log_probs.grad[0, :2] < 0).all() and (log_probs.grad[1] > 0).all()
    assert log_probs.grad[0, 2] < 0  # masked steps carry log p = 0 but the same advantage: no effect on p


def test_sentence_classifier_reads_each_sentence_to_its_last_word() -> None:
    torch.manual_seed(0)
    model = SentenceClassifier(12, 3, embed_dim=8, hidden=16).eval()
    short = torch.tensor([[5, 6, PAD, PAD]])
    assert torch.allclose(model(short)["logits"], model(torch.tensor([[5, 6]]))["logits"], atol=1e-6)


SMALL = ["--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.batch_size=32",
         "--model.init_args.encoder_epochs=1", "--model.init_args.sentence_classifier_epochs=1",
         "--trainer.max_epochs=1", "--progress_bar.refresh_rate=0"]


def test_stages_chain_by_checkpoint_and_refuse_a_mismatched_variant(in_tmp_dir) -> None:
    import pytest

    from tests.conftest import REPO
    from train import main

    config = lambda stem: str(REPO / "configs" / "textual" / f"{stem}.yaml")  # noqa: E731
    main(["fit", "--config", config("description"), *SMALL])
    source = in_tmp_dir / "checkpoints" / "textual_description" / "checkpoints" / "last.ckpt"
    cli = main(["fit", "--config", config("explanation_dis"), *SMALL, f"--model.init_args.init_checkpoint={source}"])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss_discriminative", "train/reward", "val/cider_d", "val/class_rank", "val/attribute_recall",
            "val/acc", "val/bleu_4", "val/rouge_l"} <= set(metrics)
    assert bool(cli.model.image_encoder_ready) and bool(cli.model.sentence_classifier_ready)  # loaded, not retrained
    with pytest.raises(ValueError, match="does not fit variant 'explanation'"):  # CheckpointError, as the CLI wraps it
        main(["fit", "--config", config("explanation"), *SMALL, f"--model.init_args.init_checkpoint={source}"])
    # Resuming a different variant through the Python API is refused by name (LightningCLI's --ckpt_path instead
    # rebuilds the model from the checkpoint's own hyperparameters).
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem

    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=in_tmp_dir)
    with pytest.raises(ValueError, match="holds an explanation model with variant='description'"):
        trainer.fit(TextualSystem(variant="explanation-label"), datamodule=PartsWorldDataModule(
            num_train=32, num_val=16), ckpt_path=str(source))


def test_variant_chain_script_runs_end_to_end(in_tmp_dir) -> None:
    from benchmarks.textual_variants import CONTROL, main

    rows = main(["--name", "tv", *SMALL, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    assert [r["variant"] for r in rows] == ["description", "definition", "explanation-label", "explanation-dis",
                                            "explanation", CONTROL]
    assert all(r["seed"] == 0 and "cider_d" in r and "class_rank" in r for r in rows)
    folder = in_tmp_dir / "checkpoints" / "tv"
    assert {"variants.md", "mean_over_seeds.csv", "explanation_changes.csv"} <= {p.name for p in folder.iterdir()}
    assert (folder / "seed0" / "explanation_label_same_budget" / "checkpoints" / "last.ckpt").is_file()


def test_variant_summary_means_over_seeds_and_changes_against_both_comparators() -> None:
    from benchmarks.textual_variants import CONTROL, summarise

    row = lambda seed, variant, cider, recall: {"seed": seed, "variant": variant, "from": "", "cider_d": cider,  # noqa
                                                "attribute_recall": recall}
    rows = [row(0, "explanation-label", 3.0, 0.6), row(0, "explanation", 2.85, 0.8), row(0, CONTROL, 2.5, 0.65),
            row(1, "explanation-label", 2.0, 0.5), row(1, "explanation", 2.2, 0.7), row(1, CONTROL, 0.0, 0.5)]
    means, changes = summarise(rows)
    assert means[1] == {"variant": "explanation", "seeds": 2, "cider_d": 2.525, "attribute_recall": 0.75}
    assert [(c["seed"], c["explanation vs"], c["cider_d change %"]) for c in changes[:3]] == [
        (0, "explanation-label", -5.0), (0, CONTROL, 14.0), (1, "explanation-label", 10.0)]
    assert changes[0]["attribute_recall change"] == pytest.approx(0.2)
    assert math.isnan(changes[3]["cider_d change %"])  # a zero CIDEr-D comparator gives no ratio


def test_cub_reads_the_sentence_folders_when_present(cub_root) -> None:
    import pytest

    from datamodules import CUB200DataModule, DatasetLayoutError

    images = sorted((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    text_root = cub_root / "text_c10"
    for i, path in enumerate(images):
        target = text_root / path.relative_to(cub_root / "CUB_200_2011" / "images").with_suffix(".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"this bird has a red crown\nthe wings are grey and number {i}\n")
    module = CUB200DataModule(cub_root, image_size=32)
    module.setup()
    sample = module.splits["train"][0]
    assert sample["captions"].shape == (10, 32) and sample["captions"][0, 0] == 1
    words = [module.vocabulary[t] for t in sample["captions"][0].tolist() if t > 2]
    assert words == ["this", "bird", "has", "a", "red", "crown"]
    assert (sample["captions"][2:] == 0).all()  # two sentences in the file, the rest padding
    (text_root / images[0].relative_to(cub_root / "CUB_200_2011" / "images").with_suffix(".txt")).unlink()
    with pytest.raises(DatasetLayoutError, match="sentence file .* does not exist"):
        CUB200DataModule(cub_root, image_size=32)


def test_explanation_text_callback_writes_sentences_beside_references(in_tmp_dir) -> None:
    from tests.conftest import REPO
    from train import main

    cli = main(["fit", "--config", str(REPO / "configs" / "textual" / "explanation_label.yaml"), *SMALL])
    text = (in_tmp_dir / "checkpoints" / "textual_explanation_label" / "explanations" / "epoch0.md").read_text()
    assert text.count("\n") == 2 + 8 and "| 0 |" in text
    assert any(word in text for word in ("this object has", "there is", "it has"))  # references decoded to words
    assert cli.trainer.state.finished


def test_explanation_system_optimises_only_the_generator_side_and_takes_a_schedule() -> None:
    from zoo.textual.system import TextualSystem

    system = TextualSystem(variant="explanation-label", hidden=32,
                               scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    config = system.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    optimised = {id(p) for group in config["optimizer"].param_groups for p in group["params"]}
    trainable = {id(p) for name, p in system.named_parameters()
                 if not name.startswith(("sentence_classifier.", "model.image_encoder."))}
    assert optimised == trainable  # frozen encoder and reward model stay out
    fine_tuned = TextualSystem(variant="explanation-label", hidden=32, train_encoder=True)
    optimised = {id(p) for group in fine_tuned.configure_optimizers().param_groups for p in group["params"]}
    head = {id(p) for p in fine_tuned.model.image_encoder.head.parameters()}  # read by no loss: frozen (DDP)
    encoder = {id(p) for p in fine_tuned.model.image_encoder.parameters()} - head
    assert encoder <= optimised and not head & optimised
    assert fine_tuned.train().model.image_encoder.training  # not held in eval mode


def test_description_class_features_are_each_class_mean_description_state(in_tmp_dir) -> None:
    """class_features="description": the table is, per class, the mean over its training sentences of the
    description model's word-averaged LSTM2 state (recomputed here sentence by sentence), and the explanation
    model reads table[label] as its class feature."""
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem

    data = lambda: PartsWorldDataModule(num_train=32, num_val=16, batch_size=16)  # noqa: E731
    trainer = lambda: pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,  # noqa: E731
                                 enable_model_summary=False, default_root_dir=in_tmp_dir, limit_val_batches=1)
    describer = TextualSystem(variant="description", hidden=32, encoder_epochs=1, sentence_classifier_epochs=1)
    first = trainer()
    first.fit(describer, datamodule=data())
    first.save_checkpoint(in_tmp_dir / "description.ckpt")
    with pytest.raises(ValueError, match="needs description_checkpoint"):
        trainer().fit(TextualSystem(variant="explanation-label", class_features="description", hidden=16,
                                        encoder_epochs=0, sentence_classifier_epochs=0), datamodule=data())
    system = TextualSystem(variant="explanation-label", class_features="description", hidden=16,
                               description_checkpoint=str(in_tmp_dir / "description.ckpt"), encoder_epochs=0,
                               sentence_classifier_epochs=0,  # the helpers from the description run
                               encoder_checkpoint=str(in_tmp_dir / "description.ckpt"),
                               sentence_classifier_checkpoint=str(in_tmp_dir / "description.ckpt"))
    assert system.model.class_table.shape == (6, 32)  # the description model's hidden size
    trainer().fit(system, datamodule=data())
    assert bool(system.model.class_table_ready)

    reference = data()
    reference.setup("fit")
    model = describer.model.eval()
    sums, counts = torch.zeros(6, 32), torch.zeros(6)
    with torch.no_grad():
        for i in range(len(reference.splits["train"])):
            item = reference.splits["train"][i]
            feature = model.features(item["image"][None], torch.tensor([item["label"]]))
            for caption in item["captions"]:
                length = int((caption != 0).sum())  # <bos> ... <eos>
                states = model.generator.hidden_states(feature, caption[None, :length])[0]  # (length-1, H)
                sums[item["label"]] += states.mean(0)
                counts[item["label"]] += 1
    torch.testing.assert_close(system.model.class_table, sums / counts[:, None], rtol=1e-4, atol=1e-5)
    labels = torch.tensor([3, 0])
    features = system.model.features(torch.rand(2, 3, 64, 64), labels)
    torch.testing.assert_close(features[:, -32:], system.model.class_table[labels])


def test_every_textual_model_is_registered_and_names_bad_input() -> None:
    import zoo
    from zoo.textual.model import VARIANTS, variant_model_name

    names = [variant_model_name(v) for v in VARIANTS] + ["textual_sentence_classifier"]
    assert zoo.list_models("textual_*") == sorted(names)
    assert all(f"| `{name}` | textual |" in zoo.model_table() for name in names)
    images, labels = torch.rand(2, 3, 64, 64), torch.tensor([0, 5])
    tokens = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD]])
    for variant in VARIANTS:
        model = zoo.create_model(variant_model_name(variant), num_classes=6, vocab_size=12, hidden=16)
        assert model.variant == variant
        assert model(images, labels, tokens)["word_logits"].shape == (2, 4, 12)
        with pytest.raises(ValueError, match=r"expects token ids of shape \(2, L\)"):
            model(images, labels, tokens.float())
        with pytest.raises(ValueError, match=r"expects images of shape \(B, C, H, W\)"):
            model(images[0], labels, tokens)
    classifier = zoo.create_model("textual_sentence_classifier", num_classes=6, vocab_size=12)
    assert classifier(tokens)["logits"].shape == (2, 6)
    with pytest.raises(ValueError, match="SentenceClassifier expects token ids"):
        classifier(tokens[0])
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_model_name("explanation_label")


def test_stages_express_the_chain_relevance_then_discriminative(in_tmp_dir) -> None:
    """`stages`: relevance only in the first epoch (no sampling, the REINFORCE baseline untouched), relevance +
    discriminative in the second."""
    import pytorch_lightning as pl

    from datamodules import PartsWorldDataModule
    from zoo.textual.system import TextualSystem

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[set, bool]] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.epochs.append((set(trainer.callback_metrics), bool(pl_module.loss.discriminative.seen)))

    stages = [{"name": "relevance", "epochs": 1, "losses": ["loss_relevance"]},
              {"name": "discriminative", "epochs": 1, "losses": ["loss_relevance", "loss_discriminative"]}]
    system = TextualSystem(variant="explanation-label", hidden=16, discriminative_weight=0.2, encoder_epochs=1,
                           sentence_classifier_epochs=1, stages=stages)
    record = Record()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=in_tmp_dir,
                         limit_val_batches=0, callbacks=[record])
    trainer.fit(system, datamodule=PartsWorldDataModule(num_train=32, num_val=16, batch_size=16))
    (first, seen_first), (second, seen_second) = record.epochs
    assert "train/loss_relevance" in first and "train/loss_discriminative" not in first and not seen_first
    assert {"train/loss_discriminative", "train/reward"} <= second and seen_second
    assert trainer.callback_metrics["schedule/stage"].item() == 1.0


def test_compare_trains_the_explanation_model_against_its_twins(in_tmp_dir) -> None:
    from tests.conftest import REPO
    from train import main

    rows = main(["compare", "--config", str(REPO / "configs" / "textual" / "explanation.yaml"),
                 "--trainer.fast_dev_run=true", "--model.init_args.init_checkpoint=null", "--model.init_args.hidden=16",
                 *SMALL[:-2]])
    assert [row["run"] for row in rows] == ["textual", "description", "explanation_label",
                                            "no_discriminative"]  # TextualSystem.TWINS
    assert [row["model"] for row in rows] == ["textual_explanation", "textual_description",
                                              "textual_explanation_label", "textual_explanation"]
    assert all({"acc", "cider_d", "class_rank", "bleu_4", "rouge_l"} <= set(row) for row in rows)
    assert (in_tmp_dir / "checkpoints" / "textual_explanation_compare" / "report.md").is_file()


def test_captions_outside_the_vocabulary_are_named() -> None:
    from zoo.textual.system import TextualSystem

    system = TextualSystem(variant="explanation-label", hidden=16, vocab_size=12)
    batch = {"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1]),
             "captions": torch.tensor([[[BOS, 5, EOS]], [[BOS, 12, EOS]]])}
    with pytest.raises(ValueError, match="captions hold token id 12 >= vocab_size 12"):
        system.training_step(batch, 0)


def test_relevance_loss_of_a_batch_without_target_words_is_zero_not_nan() -> None:
    """Every picked reference all padding (a batch of CUB images without sentences): the mean over no words was
    NaN, which stops training under nonfinite_loss="raise"; now 0, with a (zero) gradient to the logits."""
    logits = torch.randn(2, 4, 12, requires_grad=True)
    loss = RelevanceLoss()({"word_logits": logits}, {"tokens": torch.zeros(2, 5, dtype=torch.long)})["loss_relevance"]
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def captions_with_empty_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """(B=4, R=4, L=6) captions, each image's one sentence in another row and the other rows all padding (image 3
    has no sentence), and the (B, L) sentences."""
    sentences = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD], [BOS, 7, EOS, PAD, PAD, PAD], [BOS, 8, 9, 10, EOS, PAD],
                              [PAD] * 6])
    captions = torch.zeros(4, 4, 6, dtype=torch.long)
    for image, row in enumerate((3, 0, 2, 1)):
        captions[image, row] = sentences[image]
    return captions, sentences


def test_training_teaches_a_sentence_not_an_all_padding_row() -> None:
    """The teacher-forced reference is drawn among each image's non-empty rows: before, a uniform draw over all R
    rows fed an all-padding row 3 times in 4 here (nothing to learn, and a NaN loss when a whole batch drew one)."""
    from zoo.textual.system import TextualSystem

    torch.manual_seed(0)
    system = TextualSystem(variant="explanation-label", hidden=16, vocab_size=12)
    captions, sentences = captions_with_empty_rows()
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3]), "captions": captions}
    for _ in range(8):
        assert torch.equal(system.forward_batch(batch, "train")["tokens"], sentences)
    two = captions.clone()
    two[0, 1] = sentences[2]  # two sentences: both drawn
    drawn = {tuple(system.forward_batch({**batch, "captions": two}, "train")["tokens"][0].tolist()) for _ in range(40)}
    assert drawn == {tuple(sentences[0].tolist()), tuple(sentences[2].tolist())}


def test_sentence_classifier_learns_from_sentences_not_all_padding_rows() -> None:
    """The sentence classifier's loss over a batch with all-padding rows is its loss over the sentences alone
    (before, each empty row was one more example labelled with its image's class)."""
    from zoo.textual.system import sentence_classifier_batch_loss

    torch.manual_seed(0)
    classifier = SentenceClassifier(12, 4, embed_dim=8, hidden=16).eval()
    captions, sentences = captions_with_empty_rows()
    labels = torch.tensor([0, 1, 2, 3])
    loss = sentence_classifier_batch_loss(classifier, {"captions": captions, "label": labels}, "captions", "label")
    alone = sentence_classifier_batch_loss(classifier, {"captions": sentences[:3, None], "label": labels[:3]},
                                           "captions", "label")
    torch.testing.assert_close(loss, alone)
    nothing = sentence_classifier_batch_loss(classifier, {"captions": torch.zeros(2, 3, 6, dtype=torch.long),
                                                          "label": labels[:2]}, "captions", "label")
    assert nothing.item() == 0.0 and nothing.requires_grad is torch.is_grad_enabled()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # no Trainer: metrics only
def test_bleu_and_rouge_ignore_all_padding_reference_rows() -> None:
    """An all-padding reference row decoded to "": BLEU's brevity penalty took it as the closest reference length,
    so a 4-word candidate against a 9-word reference scored 1.0 instead of 0.29."""
    from torchmetrics.text import BLEUScore

    from zoo.textual.system import TextualSystem

    system = TextualSystem(variant="explanation-label", hidden=16, vocab_size=16)
    references = torch.zeros(2, 3, 12, dtype=torch.long)
    references[0, 0, :11] = torch.tensor([BOS, 5, 6, 7, 8, 9, 10, 11, 12, 13, EOS])  # one sentence, two empty rows
    references[1, 0, :4] = torch.tensor([BOS, 5, 6, EOS])  # image 1: one sentence, two empty rows
    sentences = torch.zeros(2, 8, dtype=torch.long)
    sentences[0, :5], sentences[1, :3] = torch.tensor([5, 6, 7, 8, EOS]), torch.tensor([5, 6, EOS])
    out = {"sentences": sentences, "references": references, "labels": torch.tensor([0, 1]),
           "sentence_logits": torch.zeros(2, 6)}
    system.update_metrics(out, {}, "val")
    expected = BLEUScore(n_gram=4)(["5 6 7 8", "5 6"], [["5 6 7 8 9 10 11 12 13"], ["5 6"]])
    assert system.metrics["val_bleu_4"].compute().item() == pytest.approx(expected.item())
    assert expected.item() < 0.5


def test_sentence_classifier_dropout_is_the_papers_and_a_system_argument() -> None:
    from zoo.textual.system import TextualSystem

    assert TextualSystem(variant="explanation-label", hidden=16).sentence_classifier.drop.p == 0.75
    chosen = TextualSystem(variant="explanation-label", hidden=16, sentence_classifier_dropout=0.3)
    assert chosen.sentence_classifier.drop.p == 0.3 and chosen.hparams.sentence_classifier_dropout == 0.3


# ------------------------------------------------------------------------------------------------ audit fixes
def saved_stage(path, seed: int, **kwargs):
    """A TextualSystem (hidden 16, helpers marked ready) with seed-dependent weights, saved as a stage checkpoint."""
    from zoo.textual.system import TextualSystem

    torch.manual_seed(seed)
    system = TextualSystem(hidden=16, **kwargs)
    system.image_encoder_ready.fill_(True)
    system.sentence_classifier_ready.fill_(True)
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}, path)
    return system


def test_given_helper_checkpoints_win_over_the_stage_ones(tmp_path) -> None:
    """A stage-2 run given encoder_checkpoint / sentence_classifier_checkpoint (one judge for an ablation) loads
    them: before, the stage's helpers were copied and marked ready, so the given files were never read."""
    from zoo.engine import load_auxiliary_checkpoints
    from zoo.textual.system import TextualSystem

    stage = saved_stage(tmp_path / "stage.ckpt", 0, variant="explanation-label")
    judge = saved_stage(tmp_path / "judge.ckpt", 1, variant="description")
    judge_file = str(tmp_path / "judge.ckpt")
    system = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2,
                           init_checkpoint=str(tmp_path / "stage.ckpt"), encoder_checkpoint=judge_file,
                           sentence_classifier_checkpoint=judge_file)
    load_auxiliary_checkpoints(system)  # what prepare_auxiliaries does first
    assert torch.equal(system.model.generator.out.weight, stage.model.generator.out.weight)  # the stage's generator
    assert torch.equal(system.sentence_classifier.head.weight, judge.sentence_classifier.head.weight)
    judge_encoder, own_encoder = judge.model.image_encoder.state_dict(), system.model.image_encoder.state_dict()
    assert all(torch.equal(own_encoder[k], v) for k, v in judge_encoder.items())
    assert not torch.equal(system.sentence_classifier.head.weight, stage.sentence_classifier.head.weight)
    alone = TextualSystem(variant="explanation", hidden=16, discriminative_weight=0.2,
                          init_checkpoint=str(tmp_path / "stage.ckpt"))  # no files given: the stage's helpers
    assert bool(alone.sentence_classifier_ready) and bool(alone.image_encoder_ready)
    assert torch.equal(alone.sentence_classifier.head.weight, stage.sentence_classifier.head.weight)


def tiny_trainer(root, **kwargs):
    """A one-epoch CPU Trainer without logger, checkpoints or progress bar, `kwargs` over those settings."""
    import pytorch_lightning as pl

    settings = {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": root}
    return pl.Trainer(**(settings | kwargs))


def test_predict_writes_each_images_generated_sentence(tmp_path) -> None:
    """`train.py predict` crashed for every textual model (the base predict_step reads out["logits"]); now each
    image gets its greedy sentence in words, the class it explains and the sentence classifier's class."""
    import csv

    from datamodules import PartsWorldDataModule
    from zoo.cli.predict import PredictionWriter
    from zoo.textual.system import TextualSystem

    data = PartsWorldDataModule(num_train=32, num_val=16, num_test=12, batch_size=8)
    torch.manual_seed(0)
    system = TextualSystem(variant="explanation-label", hidden=16, encoder_epochs=1, sentence_classifier_epochs=1,
                           class_names=data.class_names)
    tiny_trainer(tmp_path, limit_val_batches=0).fit(system, datamodule=data)
    with warnings.catch_warnings():  # sentences: CSV only, and nothing said of pictures (PREDICT_PICTURES)
        warnings.filterwarnings("error", message="predict: no explanation pictures")
        tiny_trainer(tmp_path, callbacks=[PredictionWriter()]).predict(system, datamodule=data,
                                                                       return_predictions=False)
    assert not list((tmp_path / "predictions").glob("*.png"))
    rows = list(csv.DictReader((tmp_path / "predictions" / "predictions.csv").open()))
    assert len(rows) == 12 and [int(r["index"]) for r in rows] == list(range(12))
    test = data.splits["test"]
    system.eval()
    with torch.no_grad():
        images = torch.stack([test[i]["image"] for i in range(12)])
        labels = torch.stack([test[i]["label"] for i in range(12)])
        sentences, _ = system.model.explain(images, labels)
        probs = system.sentence_classifier(sentences)["logits"].softmax(-1)
    for row, sentence, label, p in zip(rows, sentences, labels, probs):
        assert row["explanation"] == data.decode(sentence)
        assert row["explained_class"] == row["label_name"] == data.class_names[int(label)]
        assert int(row["pred"]) == int(p.argmax()) and float(row["probability"]) == pytest.approx(float(p.max()),
                                                                                                   abs=1e-4)
    assert any(row["explanation"] for row in rows) and all("<" not in row["explanation"] for row in rows)
    batch = {"image": images[:4], "index": torch.arange(4)}  # no labels: the image encoder's class is explained
    out = system.predict_step(batch, 0)
    encoder_classes = system.model.image_encoder(images[:4])["logits"].argmax(-1)
    assert out["columns"]["explained_class"] == [data.class_names[int(c)] for c in encoder_classes]
    assert out["probs"].shape == (4, 6) and len(out["columns"]["explanation"]) == 4


@pytest.mark.parametrize("stem", ["explanation", "explanation_dis"])
def test_the_no_discriminative_twin_keeps_the_variant_and_the_start(stem: str) -> None:
    """compare's equal-budget twin is the config's own variant from its own init_checkpoint with the discriminative
    weight at 0; before, explanation_dis.yaml's twin was explanation-label from a description checkpoint, which
    does not fit (compare crashed)."""
    import yaml

    from tests.conftest import REPO
    from zoo.cli.compare import declared_twins, resolved_model_config
    from zoo.textual.model import VARIANTS

    path = REPO / "configs" / "textual" / f"{stem}.yaml"
    config = yaml.safe_load(path.read_text())
    twins = declared_twins(path, config)
    assert set(twins) == {"description", "explanation_label", "no_discriminative"}
    own = config["model"]["init_args"]
    twin = resolved_model_config(str(path), twins["no_discriminative"])["init_args"]
    assert twin["variant"] == own["variant"] and twin["init_checkpoint"] == own["init_checkpoint"]
    assert twin["discriminative_weight"] == 0 and own["discriminative_weight"] > 0
    start_variant = {"explanation": "explanation-label", "explanation_dis": "description"}[stem]
    assert VARIANTS[twin["variant"]] == VARIANTS[start_variant]  # the same image / class inputs: the stage fits
    for name, variant in (("description", "description"), ("explanation_label", "explanation-label")):
        scratch = resolved_model_config(str(path), twins[name])["init_args"]  # from scratch: no stage to fit
        assert scratch["variant"] == variant and scratch["init_checkpoint"] is None


def test_a_stage_two_checkpoint_restores_without_the_stage_one_file(in_tmp_dir) -> None:
    """validate / test / predict / load_from_checkpoint of a stage-2 run re-read init_checkpoint only to overwrite
    its weights, so they failed once the stage-1 file had moved; a checkpoint restore now skips it."""
    from tests.conftest import REPO
    from train import main
    from zoo.textual.system import TextualSystem

    stage = in_tmp_dir / "stage.ckpt"
    saved_stage(stage, 0, variant="explanation-label", vocab_size=25)
    cli = main(["fit", "--config", str(REPO / "configs" / "textual" / "explanation.yaml"), *SMALL,
                "--model.init_args.hidden=16", f"--model.init_args.init_checkpoint={stage}",
                "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    last = in_tmp_dir / "checkpoints" / "textual_explanation" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    trained = {k: v.clone() for k, v in cli.model.state_dict().items()}
    stage.unlink()  # the stage-1 run was moved away
    restored = TextualSystem.load_from_checkpoint(last)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in trained.items())
    main(["validate", "--config", str(REPO / "configs" / "textual" / "explanation.yaml"), *SMALL,
          "--model.init_args.hidden=16", f"--model.init_args.init_checkpoint={stage}",
          "--trainer.limit_val_batches=1", f"--ckpt_path={last}"])
    with pytest.raises(ValueError, match="does not exist"):  # a fit from the stage still needs it
        TextualSystem(variant="explanation", hidden=16, init_checkpoint=str(stage))


def write_cub_sentences(cub_root, sentence) -> None:
    """text_c10 beside CUB_200_2011: each image's file holds `sentence(image number, path)`, two lines."""
    images = sorted((cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    for i, path in enumerate(images):
        target = cub_root / "text_c10" / path.relative_to(cub_root / "CUB_200_2011" / "images").with_suffix(".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(sentence(i, path) + "\n" + sentence(i, path) + "\n")


def test_cub_vocabulary_holds_the_training_splits_words_only(cub_root) -> None:
    """With val_fraction > 0, the held-out images' words were counted into the vocabulary (the attributes' votes
    already left them out)."""
    from datamodules import CUB200DataModule

    write_cub_sentences(cub_root, lambda i, path: f"this bird has a wing number{path.stem.rsplit('_', 1)[-1]}")
    data = CUB200DataModule(cub_root, image_size=32, val_fraction=0.5, seed=0)
    rows = data.split_rows()
    assert len(rows["train"]) and len(rows["val"])
    train_words = {f"number{data.index.image_ids[r]}" for r in rows["train"]}
    held_words = {f"number{data.index.image_ids[r]}" for r in rows["val"]}
    assert train_words <= set(data.vocabulary) and not held_words & set(data.vocabulary)
    assert "sentences from" in data.describe_sentences()


def test_data_without_sentences_or_with_a_larger_vocabulary_is_named_before_training(cub_root, tmp_path) -> None:
    """CUB without text_c10 loaded silently and textual training crashed with KeyError 'captions'; a vocab_size
    below CUB's vocabulary failed only after the image encoder had trained. Both are named at fit start now
    (where the sentences were looked for; the vocabulary's size), and the first helper trained is the sentence
    classifier, whose batches name them too (train.py trains the helpers before fit)."""
    from datamodules import CUB200DataModule
    from zoo.textual.system import TextualSystem, sentence_classifier_batch_loss

    bare = CUB200DataModule(str(cub_root), image_size=32, batch_size=4)
    system = TextualSystem(variant="description", num_classes=3, hidden=16, encoder_epochs=1,
                           sentence_classifier_epochs=1)
    assert [aux.name for aux in system.auxiliaries()] == ["sentence_classifier", "model.image_encoder"]
    with pytest.raises(ValueError, match=r"gives no 'captions'.*text_c10.*looked for .*CUB_200_2011/text_c10"):
        tiny_trainer(tmp_path).fit(system, datamodule=bare)
    assert not bool(system.image_encoder_ready) and not bool(system.sentence_classifier_ready)  # nothing trained
    bare.setup()
    batch = next(iter(bare.train_dataloader()))
    with pytest.raises(ValueError, match=r"no 'captions' \(reference sentences\).*text_c10.*sentences_root"):
        sentence_classifier_batch_loss(system.sentence_classifier, batch, "captions", "label")

    write_cub_sentences(cub_root, lambda i, path: " ".join(f"word{i}x{k}" for k in range(6)))
    data = CUB200DataModule(str(cub_root), image_size=32, batch_size=4)
    assert len(data.vocabulary) > 25
    small = TextualSystem(variant="description", num_classes=3, hidden=16, encoder_epochs=1,
                          sentence_classifier_epochs=1)
    with pytest.raises(ValueError, match=f"vocab_size=25 is below the data's vocabulary of {len(data.vocabulary)}"):
        tiny_trainer(tmp_path).fit(small, datamodule=data)
    assert not bool(small.image_encoder_ready)
    data.setup()
    with pytest.raises(ValueError, match="outside the sentence classifier's vocab_size 25"):
        sentence_classifier_batch_loss(small.sentence_classifier, next(iter(data.train_dataloader())), "captions",
                                       "label")


def test_the_vocabulary_is_saved_exported_and_checked(cub_root, tmp_path) -> None:
    """The CUB vocabulary was saved nowhere, so an exported explainer's token ids could not be decoded; it is now
    in the checkpoint's hyperparameters and the model's model_kwargs (export config.json), and data with another
    vocabulary is refused."""
    import json

    import zoo
    from datamodules import CUB200DataModule
    from zoo.textual.system import TextualSystem
    from zoo.weights import CheckpointError

    write_cub_sentences(cub_root, lambda i, path: f"this bird has a {('red', 'blue', 'green')[i % 3]} crown")
    data = CUB200DataModule(str(cub_root), image_size=32, batch_size=4)
    system = TextualSystem(variant="description", num_classes=3, hidden=16, vocab_size=len(data.vocabulary),
                           encoder_epochs=1, sentence_classifier_epochs=1, max_len=8)
    trainer = tiny_trainer(tmp_path, limit_val_batches=1)
    trainer.fit(system, datamodule=data)
    trainer.save_checkpoint(tmp_path / "cub.ckpt")
    saved = torch.load(tmp_path / "cub.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["vocabulary"] == data.vocabulary == saved["model_kwargs"]["vocabulary"]
    zoo.export_checkpoint(tmp_path / "cub.ckpt", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_kwargs"]["vocabulary"] == data.vocabulary
    exported = zoo.load_exported(tmp_path / "export")
    assert exported.vocabulary == data.vocabulary
    assert TextualSystem.load_from_checkpoint(tmp_path / "cub.ckpt").hparams.vocabulary == data.vocabulary

    write_cub_sentences(cub_root, lambda i, path: f"a small bird with {('black', 'white', 'grey')[i % 3]} wings")
    other = CUB200DataModule(str(cub_root), image_size=32, batch_size=4)
    assert len(other.vocabulary) <= len(data.vocabulary) and other.vocabulary != data.vocabulary
    fresh = TextualSystem(variant="description", num_classes=3, hidden=16, vocab_size=len(data.vocabulary), max_len=8)
    with pytest.raises(CheckpointError, match="trained with a vocabulary of .* differs from token id 4"):
        tiny_trainer(tmp_path).validate(fresh, datamodule=other, ckpt_path=tmp_path / "cub.ckpt", verbose=False)
    with pytest.raises(CheckpointError, match="trained with a vocabulary"):
        tiny_trainer(tmp_path, limit_val_batches=0).fit(TextualSystem.load_from_checkpoint(tmp_path / "cub.ckpt"),
                                                        datamodule=other)
    stage_two = TextualSystem(variant="explanation-dis", num_classes=3, hidden=16, vocab_size=len(data.vocabulary),
                              max_len=8, discriminative_weight=0.2, init_checkpoint=str(tmp_path / "cub.ckpt"))
    assert stage_two.hparams.vocabulary == data.vocabulary  # the stage's words
    with pytest.raises(CheckpointError, match="trained with a vocabulary"):
        tiny_trainer(tmp_path, limit_val_batches=0).fit(stage_two, datamodule=other)


def test_sentences_without_bos_or_one_per_image_are_named_and_a_weightless_explanation_warned() -> None:
    from zoo.textual.system import TextualSystem

    with pytest.warns(UserWarning, match="discriminative_weight=0 has no discriminative loss"):
        TextualSystem(hidden=16)  # the defaults: variant explanation, weight 0
    system = TextualSystem(variant="explanation-label", hidden=16, vocab_size=12)
    captions = torch.tensor([[[BOS, 5, 6, EOS], [PAD] * 4], [[BOS, 7, EOS, PAD], [BOS, 8, EOS, PAD]]])  # (2, 2, 4)
    batch = {"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1]), "captions": captions}
    system.forward_batch(batch, "train")  # all-padding rows need no <bos>
    with pytest.raises(ValueError, match="do not start with the start token"):
        system.forward_batch({**batch, "captions": captions[..., 1:]}, "train")
    with pytest.raises(ValueError, match=r"shape \(B, R, L\).*got torch.int64 \(2, 4\).*captions\[:, None\]"):
        system.forward_batch({**batch, "captions": captions[:, 0]}, "train")
    from zoo.textual.system import sentence_classifier_batch_loss

    with pytest.raises(ValueError, match="do not start with the start token"):
        sentence_classifier_batch_loss(system.sentence_classifier, {**batch, "captions": captions[..., 1:]},
                                       "captions", "label")


def stage_two_fit(stage, name: str, *extra: str, command: str = "fit"):
    """`train.py fit` (or `command`) of configs/textual/explanation.yaml from the stage-1 file `stage` (hidden 16, one
    training and one validation batch per epoch) in the run folder checkpoints/<name>."""
    from tests.conftest import REPO
    from train import main

    return main([command, "--config", str(REPO / "configs" / "textual" / "explanation.yaml"), *SMALL,
                 "--model.init_args.hidden=16", f"--model.init_args.init_checkpoint={stage}",
                 "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                 f"--trainer.logger.init_args.name={name}", *extra])


def test_a_stage_two_run_resumes_from_last_without_the_stage_one_and_helper_files(in_tmp_dir) -> None:
    """`fit --ckpt_path last` of a stage-2 run read its stage-1 file (and its sentence_classifier_checkpoint)
    although last.ckpt replaces every weight, so a run whose stage-1 folder had moved could not resume; with a
    last checkpoint it now builds as `--ckpt_path FILE` does, trains no helper for nothing, and ends bit-identical to
    the run that never stopped."""
    from tests.test_resume import differing_tensors

    stage, judge = in_tmp_dir / "stage.ckpt", in_tmp_dir / "judge.ckpt"
    saved_stage(stage, 0, variant="explanation-label", vocab_size=25)
    saved_stage(judge, 1, variant="description", vocab_size=25)
    helper = f"--model.init_args.sentence_classifier_checkpoint={judge}"
    stage_two_fit(stage, "whole", helper, "--trainer.max_epochs=2")
    stage_two_fit(stage, "stopped", helper)  # one of the two epochs, then the stage-1 run folder is moved away
    moved = in_tmp_dir / "moved"
    moved.mkdir()
    stage.rename(moved / stage.name), judge.rename(moved / judge.name)
    stage_two_fit(stage, "stopped", helper, "--trainer.max_epochs=2", "--ckpt_path=last")
    run = in_tmp_dir / "checkpoints" / "stopped"
    assert not (run / "auxiliary").exists()  # the restore brings the helpers: none was trained for nothing
    whole = torch.load(in_tmp_dir / "checkpoints" / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    again = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["global_step"] == whole["global_step"] == 2
    differ = differing_tensors(whole, again)
    assert not differ, f"{len(differ)} of {len(whole['state_dict'])} tensors differ: {differ[:8]}"
    validated = stage_two_fit(stage, "stopped", helper, "--ckpt_path=last", command="validate")  # the same rule
    assert validated.trainer.callback_metrics["val/acc"] >= 0


def test_ckpt_path_last_without_a_last_checkpoint_starts_from_the_stage_one_file(in_tmp_dir) -> None:
    """With no last checkpoint, `--ckpt_path last` starts the run afresh (Lightning's warning): from its stage-1
    file, which it still needs, to the same weights as a run without --ckpt_path."""
    from tests.test_resume import differing_tensors

    stage = in_tmp_dir / "stage.ckpt"
    saved_stage(stage, 0, variant="explanation-label", vocab_size=25)
    stage_two_fit(stage, "plain")
    with pytest.warns(UserWarning, match="no last checkpoint available"):
        stage_two_fit(stage, "fresh", "--ckpt_path=last")
    plain, fresh = (torch.load(in_tmp_dir / "checkpoints" / name / "checkpoints" / "last.ckpt", weights_only=True)
                    for name in ("plain", "fresh"))
    differ = differing_tensors(plain, fresh)
    assert not differ, f"{len(differ)} of {len(plain['state_dict'])} tensors differ: {differ[:8]}"
    stage.unlink()
    with pytest.raises(ValueError, match="does not exist"):
        stage_two_fit(stage, "missing", "--ckpt_path=last")
