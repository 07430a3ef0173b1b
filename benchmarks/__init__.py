"""Measurements behind docs/results.md, each a module run from the repository root:

    python -m benchmarks.<name> --help

- `family_speed`: train-step time and inference throughput of every family against its opaque twins, L2X's
  explanation speed against Captum, AOG R-CNN's RoI heads alone (`--families icnn l2x renn aog textual`, `--heads`).
- `icnn_step_time`: ICNN train step against its masked and ordinary twins and the plain CNN (`--backbones`).
- `icnn_instability_floor`: location instability of oracle part filters, the floor a trained ICNN can reach.
- `l2x_race`: L2X and INVASE against Captum's explainers on the same frozen black box
  (`--config benchmarks/l2x_race.yaml`).
- `renn_data_efficiency`: ReNN, the 1-D CNN and the LSTM on 5-100 % of rule_series (`train.py ablate` grid points).
- `aog_rcnn_parse_headroom`: part IoU any parse tree can win over the uniform grid on the true boxes.
- `step_profile`: where one train step's time goes, per row of the GPU issue's table: kernels, device time against
  wall time, the costliest kernels (`--rows`).
- `textual_variants`: the five textual-explanation variants and an equal-budget control, chained by checkpoints.
- `op_counts`: aten ops and host-device synchronisations per training step of every family, counted by the profiler
  on the CPU (no `--device`).

Every script but `op_counts` takes `--device` (cpu by default; cuda where available); each has a `main(argv)`
returning its rows.
Timings go through `benchmarks.timing` (warm-up, interleaved rounds, medians, ratios within one run, CUDA
synchronised); `benchmarks.devices` parses `--device`; `CONFIGS` is the configs folder the training scripts read.
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's experiment configs, from any working dir
