"""The L2X paper's synthetic datasets (Chen et al. 2018, section 4.1; formulas as in the authors' code), each with
its ground-truth set of relevant features per sample.

X ~ N(0, I_10) and P(Y=1 | X) = 1 / (1 + exp(f(X))) with
    xor                       f = X1 X2                                                  (k = 2)
    orange_skin               f = sum_{i<=4} X_i^2 - 4                                   (k = 4)
    nonlinear_additive        f = -100 sin(0.2 X1) + |X2| + X3 + exp(-X4) - 2.4          (k = 4, authors' code)
    nonlinear_additive_paper  f = -100 sin(2 X1) + 2 |X2| + X3 + exp(-X4)                (k = 4, paper's text)
    switch                    X10 ~ N(+3, 1) for half the rows: orange skin on X1..X4;
                              X10 ~ N(-3, 1) for the other half: nonlinear additive on X5..X8   (k = 5, X10 relevant)
(the switch feature's +-3 is added to a standard normal draw, as in the authors' code). Labels are sampled from
P(Y=1 | X); the true probabilities come with every sample as "probs".
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from datamodules._base import DictDataModule, TensorDictDataset, check_split_sizes


def xor_logit(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] * x[:, 1]


def orange_skin_logit(x: torch.Tensor) -> torch.Tensor:
    return x[:, :4].square().sum(1) - 4.0


def nonlinear_additive_logit(x: torch.Tensor) -> torch.Tensor:
    return -100 * torch.sin(0.2 * x[:, 0]) + x[:, 1].abs() + x[:, 2] + torch.exp(-x[:, 3]) - 2.4


def nonlinear_additive_paper_logit(x: torch.Tensor) -> torch.Tensor:
    return -100 * torch.sin(2 * x[:, 0]) + 2 * x[:, 1].abs() + x[:, 2] + torch.exp(-x[:, 3])


# name -> (f(X), relevant feature indices, k)
SIMPLE_DATASETS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[int], int]] = {
    "xor": (xor_logit, [0, 1], 2),
    "orange_skin": (orange_skin_logit, [0, 1, 2, 3], 4),
    "nonlinear_additive": (nonlinear_additive_logit, [0, 1, 2, 3], 4),
    "nonlinear_additive_paper": (nonlinear_additive_paper_logit, [0, 1, 2, 3], 4),
}
DATASETS = [*SIMPLE_DATASETS, "switch"]
NUM_SELECTED = {**{name: k for name, (_, _, k) in SIMPLE_DATASETS.items()}, "switch": 5}


def generate(name: str, num_samples: int, num_features: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Samples of dataset `name`: features (N, d), probs (N, 2) = [P(Y=0), P(Y=1)], label (N,) drawn from them,
    relevant (N, d) bool ground-truth feature sets."""
    if name not in DATASETS:
        raise ValueError(f"Unknown L2X synthetic dataset {name!r}; choose one of {DATASETS}.")
    if num_features < 10:
        raise ValueError(f"The L2X datasets use features 1..10; num_features must be >= 10, got {num_features}.")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, num_features, generator=generator)
    relevant = torch.zeros(num_samples, num_features, dtype=torch.bool)
    if name == "switch":
        orange = torch.rand(num_samples, generator=generator) < 0.5  # (N,) which regime each row is in
        x[:, 9] += torch.where(orange, 3.0, -3.0)
        logit = torch.where(orange, orange_skin_logit(x), nonlinear_additive_logit(x[:, 4:8]))
        relevant[:, 9] = True
        relevant[:, :4] = orange[:, None]
        relevant[:, 4:8] = ~orange[:, None]
    else:
        formula, features, _ = SIMPLE_DATASETS[name]
        logit = formula(x)
        relevant[:, features] = True
    p_one = torch.sigmoid(-logit)  # 1 / (1 + exp(f))
    label = (torch.rand(num_samples, generator=generator) < p_one).long()
    return {"features": x, "probs": torch.stack([1 - p_one, p_one], 1), "label": label, "relevant": relevant}


class L2XSyntheticDataModule(DictDataModule):
    """One of the L2X synthetic datasets; batches hold features, label, probs and the relevant-feature mask.

    Args:
        dataset: xor | orange_skin | nonlinear_additive | nonlinear_additive_paper | switch.
        num_features: d (10 in the paper).
        num_train / num_val / num_test: sizes (the paper: 1e6 / 1e5; CPU-sized defaults here).
        seed: train uses `seed`, val `seed + 1`, test `seed + 2`.
    """

    num_classes = 2
    num_channels = None
    image_size = None

    def __init__(self, dataset: str = "xor", num_features: int = 10, num_train: int = 20000, num_val: int = 2000,
                 num_test: int = 2000, seed: int = 0, batch_size: int = 256, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()  # the settings that key cached helpers (zoo.engine.auxiliary)
        if dataset not in DATASETS:
            raise ValueError(f"Unknown L2X synthetic dataset {dataset!r}; choose one of {DATASETS}.")
        # an empty test split generates fine (fit never reads it): num_test may be 0
        check_split_sizes(type(self).__name__, num_train=num_train, num_val=num_val, num_test=num_test,
                          test_optional=True)
        self.dataset, self.num_features, self.seed = dataset, num_features, seed
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.num_selected = NUM_SELECTED[dataset]  # the paper's k: size of the true feature set

    @property
    def model_inputs(self) -> dict[str, Any]:
        return {"num_features": self.num_features}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for offset, (split, size) in enumerate(self.sizes.items()):
            self.splits[split] = TensorDictDataset(generate(self.dataset, size, self.num_features, self.seed + offset))
