"""interpretable-zoo models: plain nn.Modules behind a timm-style registry (no Lightning, no data code here).

    >>> import zoo
    >>> zoo.list_models("baseline_*")
    >>> model = zoo.create_model("baseline_tinycnn", num_classes=6)
    >>> maps = zoo.explain(model, images)  # (B, H, W) own explanation of each predicted class

Each family is a package (`zoo.icnn`, `zoo.l2x`, ...), found and imported here (`FAMILIES`): model.py registers its
models; its Lightning System (system.py) is imported on demand, so `import zoo` needs no Lightning.
"""

import importlib
import pkgutil

# Every package of zoo/ but the engine's is a family: importing it registers its models, so a new family is a new
# folder and touches no file here.
ENGINE_PACKAGES = ("cli", "engine", "explain")
FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and m.name not in ENGINE_PACKAGES))
for _family in FAMILIES:
    importlib.import_module(f"zoo.{_family}")
from zoo import explain  # noqa: F401  (callable: zoo.explain(model, images, method="own", target=None))
from zoo.weights import CheckpointError
from zoo.checkpoints import export_checkpoint, load_checkpoint, load_exported
from zoo.registry import create_model, is_model, list_models, model_factory, model_family, register_model
from zoo.backbones import Backbone, TinyCNN

__all__ = [
    "Backbone", "CheckpointError", "TinyCNN", "create_model", "export_checkpoint", "is_model", "list_models",
    "load_checkpoint", "load_exported", "model_factory", "model_family", "register_model", "model_table", "explain",
]


def model_table() -> str:
    """Markdown table of every registered model and the first line of its factory docstring (README sync)."""
    rows = ["| model | family | what it is |", "| --- | --- | --- |"]
    for name in list_models():
        factory = model_factory(name)
        doc = (factory.__doc__ or "").strip().splitlines()
        rows.append(f"| `{name}` | {model_family(name)} | {doc[0] if doc else ''} |")
    return "\n".join(rows)
