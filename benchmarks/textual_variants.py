"""The five textual-explanation variants of Hendricks et al. (2016) on the parts world, trained and scored in one
run: definition, description, explanation-label, then explanation-dis (from description) and explanation (from
explanation-label) with the discriminative loss.

    python benchmarks/textual_variants.py [--name textual_variants] [fit overrides, e.g. --trainer.max_epochs=2]

The description run trains the image encoder and the sentence classifier; every other variant loads those two
from its checkpoint, so all five share the image features and the reward. Each variant is `configs/textual/
<variant>.yaml`, chained by checkpoint paths. Writes checkpoints/<name>/variants.{md,csv}: CIDEr-D, class
similarity, class rank (lower is better), attribute precision / recall and the sentence classifier's accuracy on
the generated sentences, all on the validation set with greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import ZooCLI, write_report  # noqa: E402

ORDER = [  # (config stem, stage it starts from)
    ("description", None),
    ("definition", None),
    ("explanation_label", None),
    ("explanation_dis", "description"),
    ("explanation", "explanation_label"),
]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="textual_variants")
    args, extra = parser.parse_known_args(argv)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    folder = Path("checkpoints") / args.name
    last = lambda stem: str(folder / stem / "checkpoints" / "last.ckpt")  # noqa: E731
    rows = []
    for stem, start in ORDER:
        shared = [] if stem == "description" else [f"--model.init_args.encoder_checkpoint={last('description')}",
                                                     f"--model.init_args.sentence_classifier_checkpoint="
                                                     f"{last('description')}"]
        chained = [f"--model.init_args.init_checkpoint={last(start)}"] if start else []
        cli = ZooCLI(args=["--config", str(REPO / "configs" / "textual" / f"{stem}.yaml"), *shared, *chained,
                           "--progress_bar.refresh_rate=0", *extra,
                           f"--trainer.logger.init_args.name={args.name}/{stem}"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        rows.append({"variant": cli.model.hparams.variant, "from": start or "",
                     **{k.removeprefix("val/"): round(float(v), 4) for k, v in sorted(metrics.items())
                        if k != "val/loss"}})
    write_report(folder, {"variants": rows}, stem="variants")
    return rows


if __name__ == "__main__":
    main()
