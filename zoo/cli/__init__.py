"""The command line: `python train.py fit|validate|test|predict|compare|ablate ...`.

    python train.py fit --config configs/baselines/parts_world.yaml        # LightningCLI: fit/validate/test/predict
    python train.py compare --config configs/icnn/parts_world.yaml         # a family against its declared twins
    python train.py ablate --config configs/icnn/parts_world.yaml --grid model.init_args.loss.init_args.weight=[0,1]

Every run lives in checkpoints/<run>/ (the logger's name): TensorBoard events, config.yaml (the resolved
config), and checkpoints/ with last.ckpt and the best checkpoint by validation accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from zoo.cli.ablate import ABLATE_HELP, ablate
from zoo.cli.compare import COMPARE_HELP, compare
from zoo.cli.lightning import ZooCLI

def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "compare":
        parser = argparse.ArgumentParser(prog="train.py compare", epilog=COMPARE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, help="compare spec YAML")
        parser.add_argument("--explain_images", type=int, help="override explain.num_images of the spec")
        parser.add_argument("--no_explain", action="store_true", help="skip the explainers")
        known, extra = parser.parse_known_args(argv[1:])
        return compare(known.config, extra, explain_images=known.explain_images, explain=not known.no_explain)
    if argv and argv[0] == "ablate":
        parser = argparse.ArgumentParser(prog="train.py ablate", epilog=ABLATE_HELP,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", required=True, help="a fit config")
        parser.add_argument("--grid", action="append", required=True, help="key=[v1,v2,...]; repeat for axes")
        parser.add_argument("--name", help="folder under checkpoints/ (default: <config stem>_ablation)")
        known, extra = parser.parse_known_args(argv[1:])
        return ablate(known.config, known.grid, known.name or f"{Path(known.config).stem}_ablation", extra)
    return ZooCLI(args=args)
