"""timm-style model registry: small factory functions registered by name, created with keyword overrides.

As timm's `_model_to_module`, the registry records the module that registered each model; its family is the package
under `zoo` (``zoo.icnn.model`` -> ``icnn``), looked up rather than guessed."""

from __future__ import annotations

import fnmatch
import inspect
import numbers
import re
import sys
import types
import typing
import warnings
from pathlib import PurePath
from typing import Any, Callable

import torch.nn as nn

from zoo.checks import close_names, keyword_arguments, positive_int
from zoo.weights import check_same_model as _check_same_model
from zoo.weights import log_load_reports

_model_factories: dict[str, Callable[..., nn.Module]] = {}
_model_to_module: dict[str, str] = {}


class UnknownModelArgument(ValueError):
    """A keyword argument the model `model` does not take (`argument`): raised by `create_model` with a
    did-you-mean, so that `create_model_for_data` can tell an argument the data gave from one the user gave."""

    def __init__(self, message: str, model: str, argument: str) -> None:
        super().__init__(message)
        self.model, self.argument = model, argument


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `factory` under its function name; a second registration of the same name raises."""
    name = factory.__name__
    if name in _model_factories:
        raise ValueError(f"Model {name!r} is already registered (by {_model_factories[name].__module__}).")
    _model_factories[name] = factory
    _model_to_module[name] = factory.__module__
    return factory


def model_family(name: str) -> str:
    """The family (the package under zoo/) that registered `name`: "icnn", "baselines", "textual", ..."""
    model_factory(name)  # unknown names raise with suggestions
    parts = _model_to_module[name].split(".")
    return parts[1] if parts[0] == "zoo" and len(parts) > 1 else parts[0]


def input_size_aware(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Mark a factory whose model is built for one input size: the System passes the datamodule's image_size."""
    factory.input_size_aware = True  # type: ignore[attr-defined]
    return factory


def needs_image_size(name: str) -> bool:
    return getattr(model_factory(name), "input_size_aware", False)


def is_model(name: str) -> bool:
    return name in _model_factories


def list_models(filter: str | list[str] | None = None, module: str | list[str] | None = None, pretrained: bool = False,
                exclude_filters: str | list[str] | None = None) -> list[str]:
    """Sorted registered names, as timm's `list_models` (the same arguments, in its order): kept if they match any
    shell wildcard of `filter` (a pattern or a list, e.g. ``"icnn_*"``), belong to `module` (a family or a list of
    them: the package under zoo/ that registered the model, `model_family`, e.g. ``module="icnn"``; timm's
    ``"zoo.icnn"`` form is taken too; an unknown one raises, naming the families) and match none of
    `exclude_filters`. `pretrained=True` lists nothing: the zoo ships no weights (a local file comes as
    `pretrained_path`)."""
    def patterns(value: str | list[str] | None) -> list[str]:
        return [] if not value else [value] if isinstance(value, str) else list(value)

    keep, drop = patterns(filter), patterns(exclude_filters)
    families = {name.removeprefix("zoo.") for name in patterns(module)}
    known = {model_family(n) for n in _model_factories}
    unknown = sorted(families - known)
    if unknown:
        raise ValueError(f"list_models(module={module!r}): no family {', '.join(map(repr, unknown))}; the families "
                         f"are {', '.join(sorted(known))}.")
    return [] if pretrained else [n for n in sorted(_model_factories)
                                  if (not keep or any(fnmatch.fnmatchcase(n, p) for p in keep))
                                  and (not families or model_family(n) in families)
                                  and not any(fnmatch.fnmatchcase(n, p) for p in drop)]


POSITIVE_SIZES = ("num_classes", "in_chans", "image_size", "num_features", "vocab_size", "max_len", "length")


def _init_arguments(class_name: str, factory: Callable[..., nn.Module]) -> list[str]:
    """The keyword arguments of `factory` and of the class `class_name` it builds (found in the factory's module or
    the zoo's), for a did-you-mean."""
    names = keyword_arguments(factory)
    for module in [sys.modules.get(factory.__module__), *(m for n, m in sys.modules.items() if n.startswith("zoo."))]:
        cls = getattr(module, class_name, None)
        if inspect.isclass(cls):
            return list(dict.fromkeys(names + keyword_arguments(cls)))
    return names


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The registered factory for `name`; unknown names raise with the closest registered names."""
    if name not in _model_factories:
        close = close_names(name, list(_model_factories))
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} See zoo.list_models() for all {len(_model_factories)}.")
    return _model_factories[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create a registered model; keyword arguments set to None are dropped so factory defaults apply.

    timm's `pretrained=False` is accepted (it is what the zoo does anyway); `pretrained=True` is refused: the zoo
    never downloads, a local weight file (or an export folder) comes as `pretrained_path`, alone (a file given as
    `pretrained` is refused pointing there)."""
    factory = model_factory(name)
    pretrained = kwargs.pop("pretrained", False)
    if isinstance(pretrained, (str, PurePath)):  # a file named where timm's flag goes
        also = (f" (pretrained_path={kwargs['pretrained_path']!r} is given too: keep one)"
                if kwargs.get("pretrained_path") is not None else "")
        raise ValueError(f"{name}: pretrained={str(pretrained)!r} names a weight file, but pretrained is timm's "
                         f"download flag (the zoo never downloads); pass the file as "
                         f"pretrained_path={str(pretrained)!r}{also}.")
    if pretrained:
        if kwargs.get("pretrained_path") is not None:
            raise ValueError(f"{name}: pretrained=True is not needed (and refused, as the zoo never downloads): the "
                             f"weights come from pretrained_path={kwargs['pretrained_path']!r}; drop pretrained=True.")
        raise ValueError(f"{name}: pretrained=True would download weights, which the zoo never does; save them once "
                         f"to a file and pass pretrained_path=<file> (README: Real data and pretrained weights).")
    for key in POSITIVE_SIZES:  # 0 classes or channels would build a model that fails at its first batch
        value = kwargs.get(key)
        if value is not None and not positive_int(value):
            raise ValueError(f"{name}: {key} must be a positive integer; got {value!r}.")
    check_argument_names(name, kwargs)
    annotated = annotated_model_class(factory)
    check_argument_types(name, factory, kwargs, annotated)
    try:
        model = factory(**{k: v for k, v in kwargs.items() if v is not None})
    except Exception as error:
        if annotated is None:  # a value of the wrong type may be what failed: name it, as for an annotated factory
            check_argument_types(name, factory, kwargs, default_model_class(name))
        unknown = re.search(r"(\w+)(?:\.__init__)?\(\) got an unexpected keyword argument '([^']+)'", str(error))
        if not isinstance(error, TypeError) or unknown is None:
            raise
        accepted = _init_arguments(unknown.group(1), factory)
        close = close_names(unknown.group(2), accepted, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else f" It takes: {', '.join(accepted)}."
        # from None: the CLI reports an error's root cause, which would otherwise be the TypeError without the hint
        raise UnknownModelArgument(f"{name}: unknown argument {unknown.group(2)!r} (model_kwargs).{hint}", name,
                                   unknown.group(2)) from None
    if annotated is None:  # a factory without a (resolvable) return annotation: its model's class is known now
        check_argument_types(name, factory, kwargs, type(model))
    log_load_reports(model)  # what a pretrained_path gave: loaded / skipped / new tensors
    return model


def check_argument_names(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a keyword argument `name` cannot take before `create_model` drops those set to None (None: the
    model's default): `{pretrained_path:w.pth, freeze_backbone:true}` is YAML for two keys "pretrained_path:w.pth"
    and "freeze_backbone:true" set to null, and both were dropped unread, so a fine-tune trained from random weights,
    unfrozen, silently. A key that is no Python name is refused (with YAML's reason where it holds ":"); an unknown
    name set to None gets the factory's did-you-mean (other unknown names reach the factory, which refuses them).
    Known: what the factory and its model class take, and what any function or class of the factory's module takes
    (a factory passing `**kwargs` to its family's `_create_*` helper: the textual models' `encoder_kwargs`).
    A saved model rebuilt for its weights (`zoo.weights.checkpoint_replaces_weights`: load_checkpoint, export,
    --ckpt_path) was built with its defaults for such keys when it trained: it is rebuilt so, with a warning."""
    from zoo.weights import weights_will_be_replaced

    unknown = [key for key in kwargs if not key.isidentifier()]
    dropped = [key for key, value in kwargs.items() if value is None and key not in unknown]
    if dropped and not takes_any_keyword(name):
        accepted = list(dict.fromkeys(model_arguments(name) + module_arguments(name)))
        unknown += [key for key in dropped if key not in accepted]
    if not unknown:
        return
    key = unknown[0]
    if weights_will_be_replaced() and all(kwargs[k] is None for k in unknown):
        warnings.warn(f"{name}: the saved model_kwargs hold {unknown} set to null, which {name} does not take (a "
                      f"YAML typo when it trained, such as {{a:b}} for {{a: b}}): rebuilt with its defaults for "
                      f"them, as it was trained.", stacklevel=3)
        return
    if not key.isidentifier():
        why = (" YAML reads `{a:b}` as one key 'a:b' set to null: write a space after each colon, `{a: b}`."
               if ":" in key else "")
        raise UnknownModelArgument(f"{name}: {key!r} is no argument name (model_kwargs).{why}", name, key)
    accepted = model_arguments(name)
    close = close_names(key, accepted, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else f" It takes: {', '.join(accepted)}."
    raise UnknownModelArgument(f"{name}: unknown argument {key!r} (model_kwargs).{hint}", name, key)


def module_arguments(name: str) -> list[str]:
    """The keyword arguments of every function and class defined in the module of `name`'s factory: what a
    factory's `**kwargs` may reach through a helper of its family (`_create_textual(..., encoder_kwargs=...)`)."""
    module = sys.modules.get(model_factory(name).__module__)
    found: list[str] = []
    for obj in vars(module).values() if module is not None else []:
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == module.__name__:
            try:
                found += keyword_arguments(obj)
            except (TypeError, ValueError):  # no signature to read
                continue
    return list(dict.fromkeys(found))


def takes_any_keyword(name: str) -> bool:
    """Whether `name` takes keyword arguments it does not name: its factory passes `**kwargs` on to a class that
    takes them too, or to one the registry cannot find (a user's factory)."""
    built = default_model_class(name)
    return _passes_kwargs(model_factory(name)) and (built is None or _passes_kwargs(built))


def _passes_kwargs(obj: Any) -> bool:
    """Whether a function (or a class's `__init__`) takes `**kwargs`."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


PLAIN_TYPES = (bool, int, float, str)


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve here: nothing to check against
        return {}


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types (bool, int, float, str) an annotation allows, None where it allows anything else too."""
    if annotation in PLAIN_TYPES:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return tuple(members) if members and all(m in PLAIN_TYPES for m in members) else None
    return None


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, not to a model's settings
        return bool in allowed
    kinds = {int: numbers.Integral, float: numbers.Real, str: str}  # NumPy's ints and floats count
    return any(isinstance(value, kinds[t]) for t in allowed if t is not bool)


def annotated_model_class(factory: Callable[..., nn.Module]) -> type | None:
    """The class `factory`'s return annotation names (resolved, so a string annotation under `from __future__ import
    annotations` counts), None where it has none or it does not resolve to a class."""
    built = _type_hints(factory).get("return")
    return built if inspect.isclass(built) else None


_default_model_classes: dict[str, type | None] = {}  # unannotated factories: the class built with their defaults


def default_model_class(name: str) -> type | None:
    """The class `name`'s factory builds: its return annotation, else (a factory written `def f(**kwargs):`, as a
    new family may) the class of the model it builds with its defaults, built once and kept; None where that build
    fails (a factory that needs arguments)."""
    factory = model_factory(name)
    built = annotated_model_class(factory)
    if built is None:
        if name not in _default_model_classes:
            try:
                _default_model_classes[name] = type(factory())
            except Exception:  # noqa: BLE001 - a factory that needs arguments (data sizes): its class stays unknown
                _default_model_classes[name] = None
        built = _default_model_classes[name]
    return built


def model_arguments(name: str) -> list[str]:
    """The keyword arguments `name` takes: its factory's and those of the class it builds (`default_model_class`),
    annotated or not. What `compare` passes a twin of the family's `model_kwargs` (`{shared_model_kwargs}`)."""
    factory, built = model_factory(name), default_model_class(name)
    names = keyword_arguments(factory)
    return list(dict.fromkeys(names + keyword_arguments(built))) if built is not None else names


def argument_default(name: str, key: str) -> Any:
    """The default model `name` gives keyword argument `key` (its factory's, else its class's), `inspect.Parameter
    .empty` where neither declares one (a factory's `**kwargs` passing it on, a required argument)."""
    for obj in (model_factory(name), default_model_class(name)):
        target = obj.__init__ if inspect.isclass(obj) else obj
        parameter = inspect.signature(target).parameters.get(key) if obj is not None else None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return inspect.Parameter.empty


def check_argument_types(name: str, factory: Callable[..., nn.Module], kwargs: dict[str, Any],
                         built: type | None = None) -> None:
    """Refuse a keyword argument whose value is not of the plain type (bool, int, float, str) its factory or model
    class annotates: from a config or an ablation grid, `masks: maybe` is a truthy string, and the model would be
    built with masks on, silently (an int passes for a float). The model class is `built` where given, else the
    factory's return annotation; `create_model` checks a factory without one again against the class it built (a
    factory written `def f(**kwargs):` had no check at all: `freeze_backbone="false"` froze the backbone)."""
    hints = _type_hints(factory)
    built = built if built is not None else annotated_model_class(factory)
    if built is not None:
        hints = {**_type_hints(built.__init__), **hints}
    for key, value in kwargs.items():
        allowed = _plain_types(hints.get(key))
        if value is not None and allowed is not None and not _fits(value, allowed):
            raise ValueError(f"{name}: {key} must be {' or '.join(t.__name__ for t in allowed)}; got {value!r} "
                             f"({type(value).__name__}).")


def create_model_for_data(name: str, num_classes: int, in_chans: int | None, image_size: int | None,
                          data_inputs: dict[str, Any] | None, model_kwargs: dict[str, Any] | None) -> nn.Module:
    """`create_model` with what the data fixes (channels, size where the model is size-aware, `data_inputs` such as
    num_features / vocab_size) under the user's `model_kwargs`, which win. Systems and checkpoint loading use it."""
    kwargs = {"in_chans": in_chans, **(data_inputs or {})}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}  # None: the data fixes nothing
    if image_size is not None and needs_image_size(name):  # e.g. ICNN's template bank is sized for its top map
        kwargs["image_size"] = image_size
    try:
        return create_model(name, **{"num_classes": num_classes, **kwargs, **(model_kwargs or {})})
    except UnknownModelArgument as error:
        from_data = {key: value for key, value in kwargs.items()
                     if value is not None and key not in (model_kwargs or {})}  # what the user did not give
        if error.argument not in from_data:
            raise
        raise ValueError(data_mismatch_message(name, error.argument, from_data)) from None


def accepted_arguments(name: str) -> list[str]:
    """The keyword arguments `name` takes: its factory's own, or where the factory passes `**kwargs` on, those of
    the class it builds too (`model_arguments`)."""
    factory = model_factory(name)
    return model_arguments(name) if _passes_kwargs(factory) else keyword_arguments(factory)


def data_mismatch_message(name: str, argument: str, from_data: dict[str, Any], most: int = 8) -> str:
    """Why `name` cannot be built for this data: the data gave `argument` (one of `from_data`, the sizes the data
    fixes), which `name` does not take; the registered models that take every size the data gives (those of `name`'s
    family first), at most `most` of them."""
    given = ", ".join(f"{key}={value!r}" for key, value in from_data.items())
    wanted = [key for key in from_data if key != "in_chans"] or [argument]  # in_chans: the data's size where alone
    family = model_family(name)
    fitting = sorted((n for n in _model_factories if all(key in accepted_arguments(n) for key in wanted)),
                     key=lambda n: (model_family(n) != family, n))
    names = ", ".join(fitting[:most]) + (f" and {len(fitting) - most} more" if len(fitting) > most else "")
    which = (f"Models that take {' and '.join(wanted)}: {names}." if fitting else
             f"No registered model takes {' and '.join(wanted)}.")
    return (f"{name} does not take this kind of data: the data gives {given} (set by the datamodule, not by "
            f"model_kwargs), and {name} has no argument {argument!r} (it takes: "
            f"{', '.join(accepted_arguments(name))}). {which} Choose one of these, or data that {name} is built "
            f"for.")


def check_same_model(checkpoint_spec: dict[str, Any], wanted: dict[str, Any], source: str) -> None:
    """`zoo.weights.check_same_model` told whether the checkpoint's model is built for one input size
    (`needs_image_size`), so that another `image_size` is named, not left to torch's "size mismatch"."""
    name = checkpoint_spec.get("model_name")
    sized = isinstance(name, str) and is_model(name) and needs_image_size(name)
    _check_same_model(checkpoint_spec, wanted, source, sized_by_image=sized)
