"""torchmetrics Metrics for interpretability (one module per kind of claim); task metrics come from torchmetrics."""
