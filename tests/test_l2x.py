"""L2X / INVASE: the sampler, exact top-k, gradients, data generators against their formulas, selection metrics
on hand-made cases, the selector system (black box frozen, loaded, refused), text data, and the race script."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from datamodules import DatasetLayoutError, IMDBDataModule, L2XSyntheticDataModule, SyntheticSentimentDataModule
from datamodules.l2x_synthetic import generate
from datamodules.text import NEGATIVE_CUES, POSITIVE_CUES, SYNTHETIC_VOCABULARY, tokenize
from losses.l2x import INVASELoss, L2XLoss, soft_target_cross_entropy
from zoo.l2x.ops import concrete_k_subset, top_k_mask
from zoo.explain.captum import FEATURE_METHODS, attribute_features
from zoo.l2x.metrics import AgreementAccuracy, MedianRank, SelectionRecovery, feature_ranks, median_true_rank
from tests.conftest import REPO


# ------------------------------------------------------------------------------------------------ sampler
def test_concrete_sample_is_k_hot_as_tau_goes_to_zero() -> None:
    torch.manual_seed(0)
    logits = torch.randn(500, 10)
    sample = concrete_k_subset(logits, k=3, tau=1e-4)
    assert ((sample < 1e-3) | (sample > 1 - 1e-3)).all()  # every entry 0 or 1
    ones = (sample > 0.5).sum(-1)
    assert (ones >= 1).all() and (ones <= 3).all()  # k draws: up to k distinct features
    assert (ones == 3).float().mean() > 0.5  # most draws of 3 land on distinct features
    warm = concrete_k_subset(logits, k=3, tau=10.0)
    assert ((warm > 0.01) & (warm < 0.99)).float().mean() > 0.9  # a high temperature stays relaxed


def test_concrete_marginals_follow_the_softmax() -> None:
    torch.manual_seed(0)
    weights = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    draws = concrete_k_subset(weights.expand(40000, 5), k=1, tau=1e-4).argmax(-1)
    frequency = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = weights.softmax(0)
    # binomial standard error at n = 40000 is < 0.0025: 4 sigma
    assert torch.allclose(frequency, expected, atol=0.01), (frequency, expected)


def test_concrete_noise_is_resampled_every_call_and_gradient_reaches_the_logits() -> None:
    logits = torch.zeros(2, 6, requires_grad=True)
    first, second = concrete_k_subset(logits, 2, 0.5), concrete_k_subset(logits, 2, 0.5)
    assert not torch.equal(first, second)
    (first * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="k must be in"):
        concrete_k_subset(logits, 7, 0.5)


def test_top_k_takes_exactly_k_with_ties_to_the_lower_index() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 3.0, 1.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = top_k_mask(scores, 2)
    assert (mask.sum(-1) == 2).all()
    assert mask.tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_l2x_gradient_flows_to_the_explainer_and_eval_is_exact_top_k() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("l2x_vector", num_features=10, k=3, num_classes=2)
    x = torch.randn(8, 10)
    out = model.train()(x)
    L2XLoss()(out, {"teacher_probs": torch.full((8, 2), 0.5)})["loss_l2x"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scorer.parameters())
    evaluated = model.eval()(x)
    assert torch.equal(evaluated["selection"], top_k_mask(evaluated["selection_logits"], 3))
    assert torch.equal(evaluated["selection"], top_k_mask(evaluated["scores"], 3))  # scores rank as w does


def test_l2x_loss_is_the_soft_target_cross_entropy() -> None:
    logits, probs = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    log_q = [[2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)],
             [-math.log(1 + math.e), 1 - math.log(1 + math.e)]]
    expected = -sum(probs[i, j].item() * log_q[i][j] for i in range(2) for j in range(2)) / 2
    assert soft_target_cross_entropy(logits, probs).item() == pytest.approx(expected, rel=1e-6)


def test_invase_actor_reward_prefers_informative_selections() -> None:
    """A selection whose critic is as good as the baseline has reward 0; a worse critic gives a negative reward,
    so the actor loss raises the log-likelihood of the better selection."""
    probs = torch.full((2, 4), 0.5, requires_grad=True)
    selection = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = {"logits": torch.tensor([[5.0, 0.0], [0.0, 5.0]]), "baseline_logits": torch.tensor([[5.0, 0.0], [5.0, 0.0]]),
           "selection_probs": probs, "selection": selection}
    terms = INVASELoss(sparsity=0.0)(out, {"teacher_probs": teacher})
    assert set(terms) == {"loss_critic", "loss_baseline", "loss_actor"}
    terms["loss_actor"].backward()
    # Row 0: reward 0, no gradient. Row 1: negative reward pushes its selected probabilities down (gradient > 0).
    assert probs.grad[0].abs().max() < 1e-6
    assert (probs.grad[1, 2:] > 0).all() and (probs.grad[1, :2] < 0).all()


# ------------------------------------------------------------------------------------------------ data
def test_synthetic_generators_match_their_formulas() -> None:
    x_rel = {}
    for name in ("xor", "orange_skin", "nonlinear_additive", "nonlinear_additive_paper", "switch"):
        data = generate(name, 4000, seed=3)
        x, p1 = data["features"], data["probs"][:, 1]
        x_rel[name] = data["relevant"]
        if name == "xor":
            expected = 1 / (1 + torch.exp(x[:, 0] * x[:, 1]))
        elif name == "orange_skin":
            expected = 1 / (1 + torch.exp((x[:, :4] ** 2).sum(1) - 4))
        elif name == "nonlinear_additive":
            expected = 1 / (1 + torch.exp(-100 * torch.sin(0.2 * x[:, 0]) + x[:, 1].abs() + x[:, 2]
                                          + torch.exp(-x[:, 3]) - 2.4))
        elif name == "nonlinear_additive_paper":
            expected = 1 / (1 + torch.exp(-100 * torch.sin(2 * x[:, 0]) + 2 * x[:, 1].abs() + x[:, 2]
                                          + torch.exp(-x[:, 3])))
        else:
            orange = data["relevant"][:, 0]  # the regime, as the ground truth states it
            assert (data["relevant"][:, 9]).all()
            assert torch.equal(data["relevant"][:, :4], orange[:, None].expand(-1, 4))
            assert torch.equal(data["relevant"][:, 4:8], ~orange[:, None].expand(-1, 4))
            assert 2.9 < x[orange, 9].mean() < 3.1 and -3.1 < x[~orange, 9].mean() < -2.9  # N(+-3, 1)
            assert (orange == (x[:, 9] > 0)).float().mean() > 0.995  # draws crossing 0 are rare (p = 0.0013)
            add = x[:, 4:8]
            additive = 1 / (1 + torch.exp(-100 * torch.sin(0.2 * add[:, 0]) + add[:, 1].abs() + add[:, 2]
                                          + torch.exp(-add[:, 3]) - 2.4))
            expected = torch.where(orange, 1 / (1 + torch.exp((x[:, :4] ** 2).sum(1) - 4)), additive)
        assert torch.allclose(p1, expected, atol=1e-5), name
        assert abs(data["label"].float().mean() - p1.mean()) < 0.03  # labels are drawn from P(Y=1|X)
        assert x.shape == (4000, 10) and torch.allclose(data["probs"].sum(1), torch.ones(4000))
    assert x_rel["xor"][:, :2].all() and not x_rel["xor"][:, 2:].any()
    assert torch.equal(generate("xor", 50, seed=1)["features"], generate("xor", 50, seed=1)["features"])
    with pytest.raises(ValueError, match="Unknown L2X synthetic dataset 'xro'"):
        L2XSyntheticDataModule(dataset="xro")


def test_synthetic_sentiment_cues_carry_the_label() -> None:
    module = SyntheticSentimentDataModule(num_train=200, num_val=10, num_test=10, max_len=20)
    module.setup()
    data = module.splits["train"].tensors
    words = [[SYNTHETIC_VOCABULARY[t] for t in row] for row in data["tokens"].tolist()]
    for row, label, relevant in zip(words, data["label"].tolist(), data["relevant"].tolist()):
        cues = {w for w, r in zip(row, relevant) if r}
        assert cues and cues <= set(POSITIVE_CUES if label else NEGATIVE_CUES)
        assert not {w for w, r in zip(row, relevant) if not r} & set(POSITIVE_CUES + NEGATIVE_CUES)
        assert 1 <= sum(relevant) <= 3
    assert module.model_inputs == {"vocab_size": len(SYNTHETIC_VOCABULARY), "max_len": 20}


def test_imdb_reads_the_release_layout(imdb_root: Path) -> None:
    module = IMDBDataModule(imdb_root, max_len=8, max_vocab=50, val_fraction=0.34)
    module.setup()
    assert {k: len(v) for k, v in module.splits.items()} == {"train": 4, "val": 2, "test": 6}
    test = module.splits["test"].tensors
    assert test["label"].tolist() == [0, 0, 0, 1, 1, 1] and test["tokens"].shape == (6, 8)
    assert module.decode(test["tokens"][3]).startswith("a wonderful moving film great cast")
    assert tokenize("Great<br />cast, isn't it") == ["great", "cast", "isn't", "it"]
    assert module.model_inputs == {"vocab_size": 50, "max_len": 8}


def test_imdb_missing_or_empty_folders_are_clear_errors(imdb_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist.*\n.*Expected layout"):
        IMDBDataModule(imdb_root / "nope")  # at construction: before a run trains its black box
    (imdb_root / "test" / "pos").rename(imdb_root / "test" / "positive")
    with pytest.raises(DatasetLayoutError, match=r"test/pos' does not exist"):
        IMDBDataModule(imdb_root)
    (imdb_root / "test" / "positive").rename(imdb_root / "test" / "pos")
    for review in (imdb_root / "test" / "neg").iterdir():
        review.unlink()
    with pytest.raises(DatasetLayoutError, match=r"test/neg' holds no \.txt reviews"):
        IMDBDataModule(imdb_root).setup()


# ------------------------------------------------------------------------------------------------ metrics
def test_median_rank_on_hand_made_cases() -> None:
    scores = torch.tensor([[0.9, -0.8, 0.1, 0.0], [0.0, 0.1, 0.9, 0.8], [0.5, 0.1, 0.9, 0.8]])
    relevant = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0]]).bool()
    assert median_true_rank(scores, relevant).tolist() == [1.5, 3.5, 2.0]  # |-0.8| counts; ranks {3,1} -> 2
    metric = MedianRank()
    metric.update(scores, relevant)
    assert metric.compute().item() == pytest.approx(2.0)
    assert metric.values().tolist() == [1.5, 3.5, 2.0]


def authors_create_rank(scores: "np.ndarray", random: "np.random.RandomState") -> "np.ndarray":
    """Jianbo-Lab/L2X synthetic/explain.py `create_rank`, line for line (its global np.random made a seeded
    RandomState): each sample's features in a random permutation, then ranked by |score| descending."""
    import numpy as np

    scores = abs(scores)
    n, d = scores.shape
    ranks = []
    for i, score in enumerate(scores):
        idx = random.permutation(d)
        permutated_weights = score[idx]
        permutated_rank = (-permutated_weights).argsort().argsort() + 1
        rank = permutated_rank[np.argsort(idx)]
        ranks.append(rank)
    return np.array(ranks)


def test_median_rank_by_selection_follows_the_authors_protocol() -> None:
    """The authors rank the test-time output of Sample_Concrete (the hard k-hot selection), so the selected features
    take a random order among ranks 1..k; ranking the continuous scores instead favours the selector. L2X (k = 4)
    keeps three of the five true features {0, ..., 4} and the false feature 9, and scores the true ones first: by
    the scores the true ranks are {1, 2, 3, 5, 6}, median 3; by the selection three of {1, ..., 4} and two of
    {5, ..., 10}, median max(three of 1..4) = 4 in 3 samples of 4 (3 in the rest). INVASE selecting nothing: the
    optimum 1.5 by its scores, a mean of two random ranks of 1..10 by its selection (median 5.5)."""
    import numpy as np

    n, generator = 4000, torch.Generator().manual_seed(0)
    base = torch.tensor([0.30, 0.25, 0.20, 0.04, 0.03, 0.01, 0.01, 0.01, 0.01, 0.15])
    scores = base + 1e-3 * torch.rand(n, 10, generator=generator)  # (n, 10) each sample its own scores
    selection = torch.zeros(n, 10)
    selection[:, [0, 1, 2, 9]] = 1.0  # the same k-hot selection in every sample
    relevant = torch.zeros(n, 10, dtype=torch.bool)
    relevant[:, :5] = True
    authors = np.median(authors_create_rank(selection.numpy(), np.random.RandomState(0))[:, :5], axis=1)  # (n,)
    assert np.median(authors) == 4.0 and 0.2 < (authors == 3.0).mean() < 0.3

    by_scores, by_selection = MedianRank(), MedianRank(rank_by="selection")
    for rows in torch.arange(n).split(1000):  # batches: each sample ranks the same in any batch
        by_scores.update(scores[rows], relevant[rows])
        by_selection.update(scores[rows], relevant[rows], selection[rows])
    assert by_scores.compute().item() == 3.0  # today's metric, kept
    assert by_selection.compute().item() == float(np.median(authors)) == 4.0
    per_sample = by_selection.values()
    # each sample draws its own order (one order for every sample sharing a selection would give all 3 or all 4)
    assert set(per_sample.tolist()) == {3.0, 4.0} and 0.2 < (per_sample == 3.0).float().mean().item() < 0.3
    reordered = MedianRank(rank_by="selection")
    reordered.update(scores.flip(0), relevant, selection)  # another batch order: the same per-sample ranks
    assert torch.equal(reordered.values().flip(0), per_sample)

    nothing = torch.zeros(n, 10)  # INVASE keeping no feature, its probabilities ranking the true ones {0, 1} first
    relevant_two = torch.zeros(n, 10, dtype=torch.bool)
    relevant_two[:, :2] = True
    authors = np.median(authors_create_rank(nothing.numpy(), np.random.RandomState(1))[:, :2], axis=1)
    assert np.median(authors) == 5.5
    by_scores, by_selection = MedianRank(), MedianRank(rank_by="selection")
    by_scores.update(scores, relevant_two)
    by_selection.update(scores, relevant_two, nothing)
    assert by_scores.compute().item() == 1.5 and by_selection.compute().item() == 5.5
    with pytest.raises(ValueError, match="rank_by='selection'.*update\\(scores, relevant, selection\\)"):
        MedianRank(rank_by="selection").update(scores, relevant)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        MedianRank(rank_by="selections")


def test_ties_are_broken_at_random() -> None:
    torch.manual_seed(0)
    ranks = feature_ranks(torch.zeros(4000, 4))
    assert sorted(ranks[0].tolist()) == [1, 2, 3, 4]
    first_rank_share = torch.bincount(ranks[:, 0], minlength=5)[1:].float() / 4000
    assert torch.allclose(first_rank_share, torch.full((4,), 0.25), atol=0.03)


def test_selection_recovery_and_agreement_on_hand_made_cases() -> None:
    recovery = SelectionRecovery()
    selection = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    relevant = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]).bool()
    recovery.update(selection, relevant)
    result = recovery.compute()
    assert result["tpr"].item() == pytest.approx((1 + 2 / 3) / 2)
    assert result["fdr"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result["num_selected"].item() == pytest.approx(2.5)
    agreement = AgreementAccuracy()
    agreement.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
                     torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]))
    agreement.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert agreement.compute().item() == pytest.approx(3 / 4)


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_perturbation_methods_take_a_sample_count(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """"lime:5000" runs Lime with 5000 perturbations per sample (the lime package's default), plain "lime" with
    Captum's; no other method takes a count."""
    import captum.attr

    from zoo.explain.captum import perturbation_samples

    explainer = captum.attr.KernelShap if method == "kernel_shap" else captum.attr.Lime
    seen, attribute = [], explainer.attribute
    monkeypatch.setattr(explainer, "attribute", lambda self, *a, **kw: seen.append(kw.get("n_samples"))
                        or attribute(self, *a, **kw))
    mlp = zoo.create_model("baseline_mlp", num_features=10, num_classes=2).eval()
    name, count = perturbation_samples(f"{method}:7")
    assert (name, count) == (method, 7) and perturbation_samples(method) == (method, None)
    assert attribute_features(mlp, torch.randn(1, 10), torch.tensor([0]), name, n_samples=count).shape == (1, 10)
    attribute_features(mlp, torch.randn(1, 10), torch.tensor([0]), name)
    assert seen == [7, None]
    for bad in ("saliency:3", f"{method}:x", f"{method}:0"):
        with pytest.raises(ValueError, match="sample count"):
            perturbation_samples(bad)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_captum_feature_attributions_rank_vectors_and_patches(method: str) -> None:
    torch.manual_seed(0)
    mlp = zoo.create_model("baseline_mlp", num_features=10, num_classes=2).eval()
    assert attribute_features(mlp, torch.randn(3, 10), torch.tensor([0, 1, 0]), method).shape == (3, 10)
    cnn = zoo.create_model("baseline_smallcnn", num_classes=2).eval()
    patches = zoo.create_model("l2x_patches", num_classes=2).space
    scores = attribute_features(cnn, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), method, patches.feature_ids(), 16)
    assert scores.shape == (2, 16) and (scores >= 0).all()


# ------------------------------------------------------------------------------------------------ system
def fit_selector(tmp: Path, initial_black_box: dict | None = None) -> "object":
    import pytorch_lightning as pl

    from zoo.l2x.system import L2XSystem

    pl.seed_everything(0, verbose=False)
    data = L2XSyntheticDataModule(dataset="xor", num_train=512, num_val=256, num_test=256, batch_size=128)
    system = L2XSystem(data_inputs=data.model_inputs, model_kwargs={"k": 2}, black_box_epochs=3,
                            evaluator_epochs=1)
    if initial_black_box is not None:
        initial_black_box.update({k: v.clone() for k, v in system.black_box.state_dict().items()})
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    trainer.fit(system, datamodule=data)
    return system, trainer


def test_selector_system_trains_the_black_box_first_then_keeps_it_frozen(tmp_path: Path) -> None:
    from zoo.engine import prepare_auxiliaries
    from zoo.l2x.system import L2XSystem

    initial: dict[str, torch.Tensor] = {}
    system, trainer = fit_selector(tmp_path, initial)
    assert bool(system.black_box_ready) and bool(system.evaluator_ready)
    assert not torch.equal(initial["head.weight"], system.black_box.head.weight)  # trained before the selector
    assert {"val/acc", "val/evalx_acc", "val/median_rank", "val/median_rank_selection", "val/tpr",
            "val/fdr"} <= set(trainer.callback_metrics)
    frozen = {k: v.clone() for k, v in system.black_box.state_dict().items()}
    prepare_auxiliaries(system, trainer, trainer.datamodule)  # already trained: nothing is retrained
    trainer.fit_loop.max_epochs = 3
    trainer.fit(system, datamodule=trainer.datamodule)
    assert all(torch.equal(frozen[k], v) for k, v in system.black_box.state_dict().items())
    assert not any(p.requires_grad for p in system.black_box.parameters())

    saved = tmp_path / "selector.pt"
    torch.save(system.state_dict(), saved)
    loaded = L2XSystem(data_inputs={"num_features": 10}, model_kwargs={"k": 2}, black_box_checkpoint=str(saved))
    assert bool(loaded.black_box_ready) and not bool(loaded.evaluator_ready)
    assert all(torch.equal(frozen[k], v) for k, v in loaded.black_box.state_dict().items())


def test_selector_system_refuses_mismatched_black_box_weights_and_non_selectors(tmp_path: Path) -> None:
    from zoo import CheckpointError
    from zoo.l2x.system import L2XSystem

    wrong = tmp_path / "wrong.pt"
    torch.save(zoo.create_model("baseline_mlp", num_features=12).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit the black box"):
        L2XSystem(data_inputs={"num_features": 10}, black_box_checkpoint=str(wrong))
    torch.save({"unrelated.weight": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match="missing"):
        L2XSystem(data_inputs={"num_features": 10}, black_box_checkpoint=str(wrong))
    with pytest.raises(ValueError, match="is not a feature selector"):
        L2XSystem(model_name="baseline_mlp", data_inputs={"num_features": 10})


@pytest.mark.parametrize("model_name, loss, fits", [("l2x_vector", INVASELoss, "L2XLoss"),
                                                     ("invase_vector", L2XLoss, "INVASELoss")])
def test_selector_system_refuses_the_other_selectors_loss(model_name: str, loss: type, fits: str) -> None:
    """INVASELoss on L2X raised KeyError 'baseline_logits' at the first step, after the black box and the evaluator
    had trained; L2XLoss on INVASE trained to the end with the actor's gradients all zero. Both are refused when the
    System is built, naming both losses."""
    from zoo.l2x.system import L2XSystem

    with pytest.raises(ValueError, match=rf"loss {loss.__name__} does not fit model_name='{model_name}'.*"
                                         rf"Use losses\.l2x\.{fits} with {model_name}"):
        L2XSystem(model_name=model_name, data_inputs={"num_features": 10}, loss=loss())
    L2XSystem(model_name=model_name, data_inputs={"num_features": 10})  # the default loss fits


def test_race_script_writes_table_speed_and_boxplot(in_tmp_dir: Path) -> None:
    import yaml

    from benchmarks.l2x_race import main

    settings = yaml.safe_load((REPO / "benchmarks" / "l2x_race.yaml").read_text())
    settings |= {"data": {"num_train": 256, "num_val": 64, "num_test": 64, "batch_size": 128}, "epochs": 1,
                 "black_box_epochs": 1, "evaluator_epochs": 1, "num_explained": 16, "num_explained_perturbation": 2,
                 "repeats": 1, "overrides": {"digits_3v8": {"black_box_epochs": 1, "evaluator_epochs": 1}}}
    (in_tmp_dir / "race.yaml").write_text(yaml.safe_dump(settings))
    rows = main(["--config", "race.yaml", "--name", "race", "--datasets", "switch", "digits_3v8"])
    assert [(r["dataset"], r["method"]) for r in rows] == [(d, m) for d in ("switch", "digits_3v8")
                                                           for m in settings["methods"]]
    assert all(r["n"] == (2 if r["method"] in ("kernel_shap", "lime") else 16)
               for r in rows if r["dataset"] == "switch")
    assert all(1 <= r["median_rank"] <= 10 for r in rows if r["dataset"] == "switch")
    folder = in_tmp_dir / "checkpoints" / "race"
    assert (folder / "race.md").is_file() and (folder / "speed.csv").is_file()
    legend = (folder / "race.md").read_text().split("## speed")[0].splitlines()[-2]  # race.md had no legend
    assert legend == ("higher is better: tpr, posthoc_acc, evalx_acc, samples_per_s; lower is better: median_rank, "
                      "median_rank_selection, mean_rank, fdr, ms_per_sample, train_s")
    assert (folder / "median_rank_boxplot.png").stat().st_size > 1000


@pytest.mark.parametrize("config", ["configs/l2x/digits.yaml", "configs/l2x/sentiment.yaml"])
def test_selection_callback_shows_selected_patches_and_words(config: str, in_tmp_dir: Path) -> None:
    from train import main

    small = ["--data.init_args.num_train=256", "--data.init_args.num_val=64"] if "sentiment" in config else []
    cli = main(["fit", "--config", str(REPO / config), "--trainer.max_epochs=1", "--model.init_args.black_box_epochs=1",
                "--model.init_args.evaluator_epochs=1", "--progress_bar.refresh_rate=0", *small])
    folder = Path(cli.trainer.log_dir) / "selection"
    if "digits" in config:
        from PIL import Image

        assert Image.open(folder / "epoch0.png").size[0] > 8 * 64  # 8 images enlarged to 64 px
    else:
        text = (folder / "epoch0.md").read_text()
        assert text.count("**") >= 2 * 3 * 8 and "(true: [" in text  # k = 3 bold words in each of 8 texts


def test_compare_reports_l2x_its_black_box_and_the_post_hoc_explainers(in_tmp_dir: Path) -> None:
    """`train.py compare` of an L2X config: L2X and its declared twin (the black box as a classifier) in the models
    table; L2X and every Captum method explaining L2X's black box, scored alike on the same samples."""
    import csv

    from train import main

    rows = main(["compare", "--config", str(REPO / "configs/l2x/xor.yaml"), "--trainer.max_epochs=1",
                 "--data.init_args.num_train=512", "--data.init_args.num_val=64", "--explain_images=8",
                 "--progress_bar.refresh_rate=0"])
    assert [(row["run"], row["model"]) for row in rows] == [("l2x", "l2x_vector"), ("black_box", "baseline_mlp")]
    assert {"acc", "posthoc_acc", "evalx_acc", "black_box_acc", "median_rank", "tpr", "num_selected"} <= set(rows[0])
    assert "posthoc_acc" not in rows[1]  # the twin's `acc` is label accuracy, as L2X's
    report = in_tmp_dir / "checkpoints" / "l2x_xor_compare"
    with open(report / "explanations.csv") as f:
        explained = list(csv.DictReader(f))
    assert [(r["run"], r["method"]) for r in explained] == [("l2x", m) for m in ("l2x", *FEATURE_METHODS, "random")]
    text = (report / "report.md").read_text()  # the explanation table's legend names every score, mean_rank too
    assert "lower is better: median_rank, median_rank_selection, mean_rank, fdr, ms_per_sample" in text
    for row in explained:
        assert row["n"] == "8" and row["num_selected"] == "2.0"  # k = 2 features kept by every method
        assert 1.5 <= float(row["median_rank"]) <= 9.5  # between the optimum and the worst of d = 10
        assert 1.5 <= float(row["median_rank_selection"]) <= 9.5  # the authors' protocol beside it
        assert all(0 <= float(row[k]) <= 1 for k in ("tpr", "fdr", "posthoc_acc", "evalx_acc"))
    assert not list(report.glob("explanations_*.png"))  # no picture of vectors


def test_random_selection_is_the_seeded_floor_and_never_picks_padding() -> None:
    import math

    from zoo.l2x.scores import explain_features

    selector = zoo.create_model("l2x_tokens", vocab_size=50, max_len=8, num_classes=2, k=2).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [8, 9, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    first = explain_features("random", {"l2x": selector}, None, tokens, torch.zeros(3, dtype=torch.long), 2, 1, None)
    again = explain_features("random", {"l2x": selector}, None, tokens, torch.zeros(3, dtype=torch.long), 2, 1, None)
    selection = first[1]
    assert torch.equal(selection, again[1]) and math.isnan(first[2])
    assert torch.equal(selection.sum(1), torch.full((3,), 2.0)) and not selection[tokens == 0].any()
    assert torch.equal(selection[1], torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0]))


@pytest.mark.parametrize("model_name", ["l2x_vector", "invase_vector"])
def test_selector_trains_on_a_split_that_leaves_a_last_batch_of_one(model_name: str, tmp_path: Path) -> None:
    """257 samples in batches of 256: the approximator's (critic's, baseline's) BatchNorm cannot train on the last
    batch of one ("Expected more than 1 value per channel"); the train loader drops that batch only."""
    import pytorch_lightning as pl

    from zoo.l2x.system import L2XSystem

    pl.seed_everything(0, verbose=False)
    data = L2XSyntheticDataModule(dataset="xor", num_train=257, num_val=64, num_test=64, batch_size=256)
    system = L2XSystem(model_name=model_name, data_inputs=data.model_inputs,
                       model_kwargs={"k": 2} if model_name == "l2x_vector" else None, black_box_epochs=1,
                       evaluator_epochs=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(system, datamodule=data)
    assert trainer.global_step == 1 and "val/acc" in trainer.callback_metrics


def test_padding_is_never_reported_as_selected() -> None:
    """A text of fewer than k words: the test-time top-k takes k positions, some of them padding; the selection,
    num_selected / FDR, the predict CSV's `selected` column and every compared method keep the words only."""
    import functools

    from zoo.l2x.scores import explain_features, wall_time
    from zoo.l2x.system import L2XSystem

    torch.manual_seed(0)
    system = L2XSystem(model_name="l2x_tokens", data_inputs={"vocab_size": 50, "max_len": 8}, model_kwargs={"k": 5},
                       black_box="baseline_textcnn", black_box_epochs=1, evaluator_epochs=0, input_key="tokens").eval()
    tokens = torch.tensor([[5, 7, 9, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    selection = system.model(tokens)["selection"]
    assert torch.equal(selection[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0])) and selection[1].sum() == 5
    relevant = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    recovery = SelectionRecovery()
    recovery.update(selection, relevant)
    assert recovery.compute()["num_selected"] == 4.0  # (3 + 5) / 2
    assert torch.isclose(recovery.compute()["fdr"], torch.tensor((2 / 3 + (5 - int(selection[1, 0])) / 5) / 2))
    predicted = system.predict_step({"tokens": tokens, "label": torch.zeros(2, dtype=torch.long)}, 0)
    assert predicted["columns"]["selected"][0] == "0 1 2"
    assert torch.equal(predicted["explanation"], selection)
    timer = functools.partial(wall_time, device=tokens.device)
    target = torch.zeros(2, dtype=torch.long)
    for method in ("l2x", "random", "saliency"):
        _, chosen, _ = explain_features(method, {"l2x": system.model}, system.black_box, tokens, target, 5, 1, timer)
        assert torch.equal(chosen[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0])) and chosen[1].sum() == 5, method


def test_vector_nets_take_the_authors_activation_and_batchnorm_order() -> None:
    """Defaults (the recorded figures'): ReLU, Linear-BN-ReLU. The authors' code: SELU for nonlinear additive and
    switch, Dense(activation) then BatchNormalization."""
    import torch.nn as nn

    default = zoo.create_model("l2x_vector", num_features=10, k=4)
    assert [type(m) for m in default.approximator.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear,
                                                           nn.BatchNorm1d, nn.ReLU, nn.Linear]
    for name in ("l2x_vector", "invase_vector"):
        authors = zoo.create_model(name, num_features=10, activation="selu", norm_after_activation=True)
        assert [type(m) for m in authors.scorer.net] == [nn.Linear, nn.SELU, nn.Linear, nn.SELU, nn.Linear]
        critics = [authors.approximator] + ([authors.baseline] if name == "invase_vector" else [])
        for critic in critics:
            assert [type(m) for m in critic.net] == [nn.Linear, nn.SELU, nn.BatchNorm1d, nn.Linear, nn.SELU,
                                                     nn.BatchNorm1d, nn.Linear]
        assert authors.train()(torch.randn(4, 10))["logits"].shape == (4, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        zoo.create_model("l2x_vector", num_features=10, activation="tanh")


@pytest.mark.parametrize("k", [2.5, True, 0])
def test_k_must_be_a_whole_number_of_features(k: object) -> None:
    """k = 2.5 was accepted and failed at the first forward (`slice indices must be integers`), after ablate had
    trained the points before it."""
    with pytest.raises(ValueError, match=r"k( \(features selected per sample\))? must be (int|an integer in)"):
        zoo.create_model("l2x_vector", k=k)  # the registry's type check, or for 0 the model's own range check


# ------------------------------------------------------------------------------------------------ audit fixes
L2X_CONFIGS = sorted(str(path.relative_to(REPO)) for path in (REPO / "configs" / "l2x").glob("*.yaml"))


@pytest.mark.parametrize("config", L2X_CONFIGS)
def test_the_black_box_twin_trains_with_the_classifier_loss(config: str, in_tmp_dir: Path) -> None:
    """compare's black_box twin is a ClassifierSystem; it kept the config's loss (invase_switch.yaml: INVASELoss),
    so compare crashed after INVASE trained (KeyError 'teacher_probs'). Its loss is reset to the classifier's."""
    import yaml

    from zoo.cli.compare import _fit_args, read_compare_spec, resolved_model_config

    spec = read_compare_spec(REPO / config)
    args = _fit_args("black_box", spec["runs"]["black_box"], REPO / config, [], [])
    assert args[:2] == ["--config", str(REPO / config)]
    twin = resolved_model_config(args[1], args[2:])
    assert twin["class_path"].endswith("ClassifierSystem") and twin["init_args"].get("loss") is None
    from zoo.cli.lightning import ParsedCLI

    checkpoint = ParsedCLI(args=args, run=False).config.checkpoint  # what the classifier logs, not posthoc_acc
    assert (checkpoint.monitor, checkpoint.mode) == ("val/acc", "max")
    if "loss" not in (yaml.safe_load((REPO / config).read_text())["model"]["init_args"]):
        return
    from zoo.cli.lightning import ZooCLI

    cli = ZooCLI(args=[*args, "--data.init_args.num_train=64", "--data.init_args.num_val=32"], run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    terms = cli.model.compute_loss(cli.model.forward_batch(batch, "train"), batch, "train")
    assert set(terms) == {"loss_task"} and torch.isfinite(terms["loss_task"])  # the classifier's cross-entropy


def test_acc_is_label_accuracy_and_posthoc_acc_is_agreement_with_the_black_box(tmp_path: Path) -> None:
    """`acc` meant post-hoc agreement for L2X but label accuracy for its twin in compare's models table. Now `acc` is
    the approximator's accuracy on the labels, `posthoc_acc` the black box on the selection against the black box."""
    system, trainer = fit_selector(tmp_path)
    data = trainer.datamodule
    batch = torch.utils.data.default_collate([data.splits["val"][i] for i in range(len(data.splits["val"]))])
    system.eval()
    with torch.no_grad():
        out = system.model(batch["features"])
        teacher = system.black_box(batch["features"])["logits"].argmax(-1)
        kept = system.black_box(system.model.mask_input(batch["features"], out["selection"]))["logits"].argmax(-1)
    metrics = trainer.validate(system, datamodule=data, verbose=False)[0]
    assert metrics["val/acc"] == pytest.approx((out["logits"].argmax(-1) == batch["label"]).float().mean().item())
    assert metrics["val/posthoc_acc"] == pytest.approx((kept == teacher).float().mean().item())
    assert metrics["val/approximator_fidelity"] == pytest.approx(
        (out["logits"].argmax(-1) == teacher).float().mean().item())


@pytest.mark.parametrize("config", L2X_CONFIGS)
def test_l2x_configs_keep_the_most_faithful_checkpoint_and_invase_the_last(config: str) -> None:
    """INVASE's best checkpoint by val/acc (the default monitor) was its densest selector: every accuracy on the
    selected input rises with more features kept. L2X (k fixed) keeps the best post-hoc accuracy."""
    import yaml

    from zoo.cli.lightning import ParsedCLI

    settings = yaml.safe_load((REPO / config).read_text())
    checkpoint = ParsedCLI(args=["--config", str(REPO / config)], run=False).config.checkpoint  # as fit parses it
    if "invase" in settings["model"]["init_args"]["model_name"]:
        assert checkpoint.monitor is None  # the last epoch's
    else:
        assert (checkpoint.monitor, checkpoint.mode) == ("val/posthoc_acc", "max")


def test_num_selected_is_logged_without_ground_truth(tmp_path: Path) -> None:
    """num_selected (INVASE's instance-wise selection size) was logged only where the data had true features."""
    import pytorch_lightning as pl

    from zoo.l2x.system import L2XSystem

    pl.seed_everything(0, verbose=False)
    data = L2XSyntheticDataModule(dataset="xor", num_train=128, num_val=64, num_test=64, batch_size=64)
    system = L2XSystem(model_name="invase_vector", data_inputs=data.model_inputs, black_box_epochs=1,
                       evaluator_epochs=0, relevant_key="no_such_field")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(system, datamodule=data)
    logged = trainer.callback_metrics
    assert "val/num_selected" in logged and 0 <= logged["val/num_selected"].item() <= 10
    assert not {"val/tpr", "val/fdr", "val/median_rank"} & set(logged)
    recovery = SelectionRecovery()
    recovery.update(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert recovery.compute() == {"num_selected": pytest.approx(1.5)}


def test_predict_names_each_review_and_its_selected_words(imdb_root: Path, in_tmp_dir: Path) -> None:
    """predictions.csv of a text selector had token positions only: now each row names its review's file and the
    selected words (`selected_words`, in text order)."""
    import csv

    from train import main

    main(["fit", "--config", str(REPO / "configs/l2x/imdb.yaml"), f"--data.init_args.root={imdb_root}",
          "--data.init_args.max_len=8", "--data.init_args.max_vocab=50", "--data.init_args.batch_size=4",
          "--model.init_args.model_kwargs.k=2", "--trainer.max_epochs=1", "--model.init_args.black_box_epochs=1",
          "--model.init_args.evaluator_epochs=0", "--trainer.logger.init_args.name=run",
          "--progress_bar.refresh_rate=0"])
    run = in_tmp_dir / "checkpoints" / "run"
    main(["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    with (run / "predictions" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [f"test/{p}/{i}_{r}.txt" for p, r in (("neg", 2), ("pos", 9))
                                             for i in range(3)]
    module = IMDBDataModule(imdb_root, max_len=8, max_vocab=50)
    module.setup()
    for row, tokens in zip(rows, module.splits["test"].tensors["tokens"]):
        words = [module.vocabulary[int(tokens[int(i)])] for i in row["selected"].split()]
        assert row["selected_words"] == " ".join(words) and len(words) == 2
        review = (imdb_root / row["file"]).read_text()
        assert all(word == "<unk>" or word in tokenize(review) for word in words)


def test_csv_text_names_each_sample_by_its_row_in_the_file(tmp_path: Path) -> None:
    from datamodules import CSVTextDataModule
    from datamodules.text import encode, read_table
    from tests.helpers import REVIEWS, write_table

    path = write_table(tmp_path / "rt.csv", REVIEWS, ",")
    data = CSVTextDataModule(path, label_column="category", labels=["rotten", "fresh"], max_len=8, max_vocab=30,
                             val_fraction=0.2, test_fraction=0.2)
    data.setup()
    rows = read_table(path, ["text", "category"])
    lookup = {word: i for i, word in enumerate(data.vocabulary) if i >= 2 and word}
    for split, samples in data.splits.items():
        names = data.sample_names(split)
        assert len(names) == len(samples)
        for name, tokens, label in zip(names, samples.tensors["tokens"], samples.tensors["label"]):
            row = rows[int(name.removeprefix("row "))]
            assert row["category"] == data.class_names[int(label)]  # the "plot" rows are counted, not kept
            assert torch.equal(tokens, encode([tokenize(row["text"])], lookup, 8)[0])


def test_concrete_noise_and_softmax_are_float32_under_bf16_autocast() -> None:
    """Under bf16 autocast the scorer's logits are bf16 and U was drawn in bf16 (~1,400 distinct values, largest
    Gumbel draw 5.5 instead of ~13). The sample now draws U and takes the softmax in float32: the same numbers as
    from float32 logits."""
    logits = torch.randn(512, 10).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        relaxed = concrete_k_subset(logits, 3, 0.1, torch.Generator().manual_seed(0))
    reference = concrete_k_subset(logits.float(), 3, 0.1, torch.Generator().manual_seed(0))
    assert relaxed.dtype == torch.float32 and torch.equal(relaxed, reference)
    model = zoo.create_model("l2x_vector", k=4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(256, 10))
    assert out["selection"].dtype == torch.float32 and out["selection"].unique().numel() > 2000


@pytest.mark.parametrize(("model_name", "kwargs", "message"), [
    ("l2x_vector", {"tau": 0.0}, "tau"), ("l2x_vector", {"tau": float("nan")}, "tau"),
    ("l2x_tokens", {"tau": -0.5}, "tau"), ("invase_vector", {"threshold": 1.5}, "threshold"),
    ("invase_vector", {"threshold": -0.1}, "threshold"), ("invase_patches", {"threshold": float("nan")}, "threshold"),
    ("l2x_patches", {"patch_size": 0}, "patch_size"), ("invase_patches", {"patch_size": 16}, "patch_size"),
])
def test_selector_settings_are_refused_when_built(model_name: str, kwargs: dict, message: str) -> None:
    """tau was checked at the first training step (after the black box and the evaluator trained; NaN accepted),
    INVASE's threshold never (1.5 selected nothing, -0.1 everything), patch_size 0 raised ZeroDivisionError."""
    with pytest.raises(ValueError, match=f"^{message} "):
        zoo.create_model(model_name, **kwargs)


def test_imdb_vocabulary_comes_from_the_training_split_only(imdb_root: Path) -> None:
    """The vocabulary was built from train + validation before the split: a word seen only in validation got an
    embedding that no training step touched, where it should read as <unk> (as CSVText does)."""
    module = IMDBDataModule(imdb_root, max_len=16, max_vocab=50, val_fraction=0.34)  # 16: every review whole
    module.setup()
    train_words = {w for tokens in module.splits["train"].tensors["tokens"] for w in module.decode(tokens).split()}
    assert {w for w in module.vocabulary[2:] if w} == train_words - {"<unk>"}
    assert (module.splits["val"].tensors["tokens"] == 1).any()  # the validation-only words are unknown


def test_tokenizer_keeps_non_ascii_words_and_tokenizes_ascii_as_before() -> None:
    import random
    import re

    assert tokenize("Café naïve, NAI\u0308VE déjà-vu") == ["café", "naïve", "naïve", "déjà", "vu"]
    ascii_words = re.compile(r"[a-z0-9']+")  # the pattern before: ASCII corpora must encode as they did
    generator = random.Random(0)
    for _ in range(2000):
        text = "".join(generator.choice([chr(c) for c in range(32, 127)] + ["<br />"]) for _ in range(30))
        assert tokenize(text) == ascii_words.findall(text.lower().replace("<br />", " ")), text


def test_compare_scores_captum_methods_on_tokens_too() -> None:
    """compare on a token config kept only the selector: Captum's methods were run for float inputs alone, though
    `attribute_features` attributes token presences."""
    from zoo.l2x.system import L2XSystem

    torch.manual_seed(0)
    data = SyntheticSentimentDataModule(num_train=16, num_val=8, num_test=8, max_len=12)
    data.setup()
    system = L2XSystem(model_name="l2x_tokens", data_inputs=data.model_inputs, model_kwargs={"k": 3},
                       black_box="baseline_textcnn", black_box_epochs=1, evaluator_epochs=0, input_key="tokens")
    rows, maps, images = system.explanation_report(data, {"num_images": 4, "methods": ["saliency", "kernel_shap",
                                                                                       "lime:20"], "num_perturbed": 2})
    assert [row["method"] for row in rows] == ["l2x", "saliency", "kernel_shap", "lime:20", "random"]  # a count: kept
    assert all(row["num_selected"] == 3.0 for row in rows) and maps == {} and images is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_explanation_report_runs_in_the_models_dtype(dtype: torch.dtype) -> None:
    """compare after a `--trainer.precision=64-true` (bf16-true) L2X fit: the report fed the float32 vectors to the
    float64 model ("MLPClassifier expects vectors of dtype torch.float64"), after the runs had trained."""
    from zoo.l2x.system import L2XSystem

    torch.manual_seed(0)
    data = L2XSyntheticDataModule(dataset="switch", num_train=16, num_val=8, num_test=8, batch_size=8)
    data.setup()
    system = L2XSystem(model_name="l2x_vector", data_inputs=data.model_inputs, black_box_epochs=1,
                       evaluator_epochs=0).to(dtype)
    rows, _, _ = system.explanation_report(data, {"num_images": 4, "methods": ["saliency"], "num_perturbed": 2})
    assert [row["method"] for row in rows] == ["l2x", "saliency", "random"]


@pytest.mark.parametrize("methods", [None, ["saliency", "random"], ["saliency"]])
def test_the_explanation_report_ends_with_the_random_floor_and_gives_every_score_a_direction(
        methods: list[str] | None) -> None:
    """The L2X table's note describes a `random` row and the README gives every model one, but the report kept only
    Captum's methods: `random`, even listed, was silently dropped. It is the last row, listed or not, once. Its
    `mean_rank` (lower is better, by the note) was in neither half of compare's legend: the rows carry the
    directions of all their scores."""
    from zoo.cli.report import legend
    from zoo.l2x.system import L2XSystem

    torch.manual_seed(0)
    data = L2XSyntheticDataModule(dataset="switch", num_train=16, num_val=8, num_test=8, batch_size=8)
    data.setup()
    system = L2XSystem(model_name="l2x_vector", data_inputs=data.model_inputs, black_box_epochs=1,
                       evaluator_epochs=0)
    settings = {"num_images": 4, "num_perturbed": 2, **({"methods": methods} if methods else {})}
    rows, _, _ = system.explanation_report(data, settings)
    listed = [m for m in (methods or FEATURE_METHODS) if m != "random"]
    assert [row["method"] for row in rows] == ["l2x", *listed, "random"]
    assert rows[-1]["num_selected"] == rows[0]["num_selected"] and "ms_per_sample" not in rows[-1]  # k, not timed
    from zoo.explain.scores import explanation_directions

    directions = explanation_directions(rows)
    scores = [c for c in dict.fromkeys(k for row in rows for k in row)
              if c not in ("method", "n", "num_selected")]
    assert {c for c in scores if directions.get(c) is None} == set()
    lower = legend(scores, directions).split("lower is better: ")[1]
    assert {"mean_rank", "median_rank", "median_rank_selection", "fdr", "ms_per_sample"} == set(lower.split(", "))


def digits_patch_selector() -> tuple[Any, Any]:
    """8-pixel digits 3 and 8, set up, and an L2X patch selector (k 4 of 2x2 patches) whose black box trains one
    epoch when its report first needs it: an image selector small enough for a unit test."""
    from datamodules import DigitsDataModule
    from zoo.l2x.system import L2XSystem

    torch.manual_seed(0)
    data = DigitsDataModule(classes=[3, 8], image_size=8, batch_size=16)
    data.setup()
    system = L2XSystem(model_name="l2x_patches", num_classes=2, in_chans=1, image_size=8,
                       data_inputs=data.model_inputs, model_kwargs={"k": 4, "patch_size": 2},
                       black_box="baseline_smallcnn", black_box_epochs=1, evaluator_epochs=0, input_key="image")
    return data, system


def test_the_random_floor_of_an_image_selector_is_a_row_but_no_map() -> None:
    """Images: the `random` row is scored, but as the image families' random reference it is no column of the
    explanation figure (the maps)."""
    data, system = digits_patch_selector()
    rows, maps, images = system.explanation_report(data, {"num_images": 4, "methods": ["saliency"]})
    assert [row["method"] for row in rows] == ["l2x", "saliency", "random"] and list(maps) == ["l2x", "saliency"]
    assert maps["l2x"].shape == (4, 8, 8) and images.shape == (4, 1, 8, 8)


def test_a_nan_selection_entry_counts_as_dropped_in_the_selection_median_rank() -> None:
    """`selection > 0.5` is the selection everywhere (SelectionRecovery too): a NaN entry is not selected. The
    one-sort ranking tested `selection <= 0.5` for dropped, which counted a NaN entry as kept."""
    from zoo.l2x.metrics import selection_median_rank

    scores = torch.rand(5, 10, generator=torch.Generator().manual_seed(0))
    selection = torch.zeros(5, 10)
    selection[:, 0] = 1.0
    relevant = torch.zeros(5, 10, dtype=torch.bool)
    relevant[:, 8] = True
    with_nan = selection.clone()
    with_nan[:, 8] = float("nan")
    torch.testing.assert_close(selection_median_rank(with_nan, scores, relevant), selection_median_rank(
        selection, scores, relevant))


# ------------------------------------------------------------------------------------------------ padding, helpers
def padded_texts(n: int = 64, words: int = 6, max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, max_len) token ids of `words` words each then padding, and (n, max_len) one true word per text."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(n, max_len, dtype=torch.long)
    tokens[:, :words] = torch.randint(1, 50, (n, words), generator=generator)
    relevant = torch.zeros(n, max_len, dtype=torch.bool)
    relevant[torch.arange(n), torch.randint(0, words, (n,), generator=generator)] = True
    return tokens, relevant


def test_median_ranks_rank_the_words_of_a_text_and_padding_after_them() -> None:
    """Padding was ranked as features: the random floor's padding scored -1.0, |score| 1 above every word, so all of
    it ranked first (median_rank 20.0 for 14.0 among the words); the selection median rank put padding among the
    dropped words (an unselected true word anywhere in k+1..max_len). Both now rank the words, padding after them.
    Known answers: every word of a 4-word text true, one selected: ranks {1, 2, 3, 4} whatever the tie order, median
    2.5; a padded position scored above every word does not push a word's rank past the word count."""
    from zoo.l2x.metrics import selection_median_rank

    selectable = torch.tensor([[True] * 4 + [False] * 4])
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.9, 0.9, 0.9, 0.9]])  # padding's attribution above every word's
    selection = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    every_word = selectable.clone()
    for seed in range(5):  # any tie order
        assert selection_median_rank(selection, scores, every_word, seed, selectable).item() == 2.5
        assert median_true_rank(scores, every_word, seed=seed, selectable=selectable).item() == 2.5
    first = torch.tensor([[True] + [False] * 7])
    assert median_true_rank(scores, first, seed=0, selectable=selectable).item() == 4.0  # the lowest of 4 words
    assert median_true_rank(scores, first, seed=0).item() == 8.0  # every position a feature: as before
    for rank_by, expected in (("scores", 4.0), ("selection", 1.0)):
        metric = MedianRank(rank_by=rank_by)
        metric.update(scores, first, selection, selectable)
        assert metric.compute().item() == expected

    from zoo.l2x.scores import compare_explainers, explain_features

    tokens, relevant = padded_texts()  # 6 words of max_len 32, k = 2
    selector = zoo.create_model("l2x_tokens", vocab_size=50, max_len=32, k=2).eval()
    black_box = zoo.create_model("baseline_textcnn", vocab_size=50, max_len=32).eval()
    scores, chosen, _ = explain_features("random", {"l2x": selector}, None, tokens, None, 2, 1, None)
    assert (scores[tokens == 0] == 0).all() and not chosen[tokens == 0].any()  # padding: no score, never selected
    explained = compare_explainers({"l2x": selector}, black_box, None, tokens, torch.zeros(64, dtype=torch.long),
                                   relevant, 2, ["l2x", "random"])
    for row in explained.rows:  # one true word among 6: every rank within the word count
        assert 1 <= row["median_rank"] <= 6 and 1 <= row["median_rank_selection"] <= 6, row
        assert 1 <= row["mean_rank"] <= 6, row
    assert (explained.ranks["random"] <= 6).all()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no trainer: the metrics update alone
def test_the_logged_median_ranks_rank_the_words_of_a_text() -> None:
    """val/median_rank_selection (MedianRank, per-sample medians gathered by `cat` under DDP) ranked padding with
    the dropped words: the System passes its model's selectable features (the words) to both median ranks."""
    from zoo.l2x.system import L2XSystem

    torch.manual_seed(0)
    system = L2XSystem(model_name="l2x_tokens", data_inputs={"vocab_size": 50, "max_len": 32},
                       model_kwargs={"k": 2}, black_box="baseline_textcnn", black_box_epochs=1, evaluator_epochs=0,
                       input_key="tokens").eval()
    tokens, relevant = padded_texts()
    batch = {"tokens": tokens, "label": torch.zeros(64, dtype=torch.long), "relevant": relevant}
    with torch.no_grad():
        system.update_metrics(system.forward_batch(batch, "val"), batch, "val")  # no trainer: updated, not logged
    for name in ("median_rank", "median_rank_selection"):
        values = system.metrics[f"val_{name}"].values()
        assert len(values) == 64 and (values <= 6).all(), (name, values.max())


def test_black_box_epochs_are_checked_when_the_system_is_built(in_tmp_dir: Path) -> None:
    """black_box_epochs 0 without black_box_checkpoint was refused by `require_black_box` at the fit's start, after
    the EVAL-X evaluator had trained (minutes on text), with a traceback; negative epochs meant 0. Both are refused
    when the System is built (one `train.py: error:` line), but where a checkpoint's weights replace the System's."""
    from zoo.cli.errors import is_configuration_error
    from zoo.l2x.system import L2XSystem
    from zoo.weights import checkpoint_replaces_weights

    inputs = {"data_inputs": {"num_features": 10}}
    with pytest.raises(ValueError, match="black_box_epochs=0 and no black_box_checkpoint.*Set black_box_epochs"):
        L2XSystem(**inputs, black_box_epochs=0)
    for name in ("black_box_epochs", "evaluator_epochs"):
        with pytest.raises(ValueError, match=rf"{name} \(epochs .*\) must be a whole number >= 0.*got -1"):
            L2XSystem(**inputs, **{name: -1})
    with checkpoint_replaces_weights():  # --ckpt_path, a resumed fit, load_from_checkpoint: the black box is in it
        L2XSystem(**inputs, black_box_epochs=0)
    L2XSystem(**inputs, black_box_epochs=1, evaluator_epochs=0)  # no evaluator: allowed

    from train import main

    with pytest.raises(ValueError, match="black_box_epochs=0 and no black_box_checkpoint") as refused:
        main(["fit", "--config", str(REPO / "configs/l2x/switch.yaml"), "--model.init_args.black_box_epochs=0",
              "--model.init_args.evaluator_epochs=1", "--data.init_args.num_train=64"])
    assert is_configuration_error(refused.value)
    assert not list(in_tmp_dir.rglob("evaluator*.ckpt"))  # refused before anything trained


def test_selection_text_reads_the_systems_relevant_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """SelectionCallback read batch["relevant"] whatever the System's `relevant_key`: the true features of data that
    names them otherwise were never shown."""
    from types import SimpleNamespace

    import zoo.l2x.callback as callback_module
    from zoo.l2x.callback import SelectionCallback
    from zoo.l2x.system import L2XSystem

    system = L2XSystem(data_inputs={"num_features": 10}, model_kwargs={"k": 2}, black_box_epochs=1,
                       evaluator_epochs=0, relevant_key="truth").eval()
    truth = torch.zeros(2, 10, dtype=torch.bool)
    truth[:, [3, 7]] = True
    callback = SelectionCallback(num_samples=2)
    callback.fixed_batch = lambda trainer: {"features": torch.randn(2, 10), "truth": truth}
    written: list[str] = []
    monkeypatch.setattr(callback_module, "log_text", lambda logger, tag, text, step: written.append(text))
    trainer = SimpleNamespace(loggers=[], logger=None, datamodule=None, global_step=0)
    callback.draw(trainer, system, None)
    assert written and written[0].count("(true: [3, 7])") == 2
