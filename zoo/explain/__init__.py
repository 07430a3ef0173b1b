"""Post-hoc explainers (Captum adapters) and faithfulness metrics, for any model of the zoo, and the one explanation
API: ``zoo.explain(model, images, method="own" | <Captum method>, target=None)`` (see `zoo.explain.api` for the
map convention). The package itself is callable, so ``zoo.explain(...)`` and ``zoo.explain.captum`` both work.
"""

import sys
import types

from zoo.explain.api import OWN, explain


class _CallableModule(types.ModuleType):
    """`zoo.explain` the package, callable as `zoo.explain.explain`."""

    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["OWN", "explain"]
