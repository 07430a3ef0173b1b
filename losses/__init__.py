"""Loss modules, one file per family: ``forward(out, batch) -> {"loss_<term>": tensor}``, summed and logged by
the engine. `losses.baselines.ClassificationLoss` is the task term every classifier shares."""
