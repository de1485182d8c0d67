"""Arms of a comparison: a ``build_loss`` name with its keywords, and callbacks of its own.

Spelling (a Python expression, parsed without evaluating it)::

    softmax                                         # a bare build_loss name
    sparse_softmax(k=10)                            # with keywords of that loss
    as_softmax(delta=0.3)                           # delta of as_softmax: the mixin's delta
    as_softmax + SkipMaskedSamples                  # plus a callback for this arm only
    l_softmax(lam=5.0) + MarginAnnealing(start=1000.0)
    as_softmax + my_package.callbacks.MyCallback(every=2)

Several arms in one string are separated by commas outside parentheses:
``"softmax,as_softmax,label_smoothing"``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from lightning_assoftmax.family import LOSS_NAMES, build_loss, loss_kwarg_names

__all__ = ["Arm", "CallbackSpec", "parse_arms", "resolve_callback_class", "split_arms"]

# Set by the mixin itself, never by an arm.
_MIXIN_OWNED = ("ignore_index", "reduction")
_SPELLING = (
    "an arm is a build_loss name, optionally with keywords and '+ Callback' terms, e.g. "
    "'as_softmax(delta=0.3) + SkipMaskedSamples'"
)


@dataclass(frozen=True)
class CallbackSpec:
    """A callback class (short name or class path) and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return self.name + _call_args(self.kwargs)

    def build(self) -> L.Callback:
        """A fresh instance (each fit gets its own: callbacks hold state)."""
        return resolve_callback_class(self.name)(**self.kwargs)


@dataclass(frozen=True)
class Arm:
    """One arm: the loss (``build_loss`` name and keywords) and the callbacks added to its fits.

    ``delta`` is the mixin's AS-Softmax delta when the arm sets it (``as_softmax(delta=0.3)``),
    else ``None`` (the model's configured delta). ``key`` is the normalized spelling that names
    the arm in the journal and the tables.
    """

    loss: str
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    delta: float | None = None
    callbacks: tuple[CallbackSpec, ...] = ()

    @property
    def key(self) -> str:
        kwargs = dict(self.loss_kwargs)
        if self.delta is not None:
            kwargs = {"delta": self.delta, **kwargs}
        return " + ".join([self.loss + _call_args(kwargs), *(c.text() for c in self.callbacks)])

    def build_callbacks(self) -> list[L.Callback]:
        return [spec.build() for spec in self.callbacks]


def _call_args(kwargs: dict[str, Any]) -> str:
    if not kwargs:
        return ""
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def split_arms(text: str) -> list[str]:
    """Split ``"a, b(x=1, y=2) + C"`` at the commas outside parentheses and brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _dotted_name(node: ast.AST, text: str) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted_name(node.value, text) + "." + node.attr
    raise ValueError(f"arm {text!r}: expected a name, got {ast.unparse(node)!r}; {_SPELLING}.")


def _term(node: ast.AST, text: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name(key=literal, ...)`` -> (name, keywords)."""
    if isinstance(node, ast.Call):
        if node.args:
            raise ValueError(
                f"arm {text!r}: {ast.unparse(node)!r} has positional arguments; name each one "
                f"(e.g. 'sparse_softmax(k=10)')."
            )
        kwargs: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise ValueError(f"arm {text!r}: '**' is not allowed; name each keyword.")
            try:
                kwargs[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                raise ValueError(
                    f"arm {text!r}: the value of {keyword.arg} ({ast.unparse(keyword.value)!r}) is not a "
                    "literal; use numbers, strings, True/False/None, lists or dicts."
                ) from None
        return _dotted_name(node.func, text), kwargs
    return _dotted_name(node, text), {}


def _terms(node: ast.AST, text: str) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left, text) + _terms(node.right, text)
    if isinstance(node, ast.BinOp):
        raise ValueError(f"arm {text!r}: terms are joined with '+' only; {_SPELLING}.")
    return [node]


def resolve_callback_class(name: str) -> type[L.Callback]:
    """The ``Callback`` subclass named ``name``: a class path (``pkg.module.Class``) or the short
    name of an imported subclass (the bundle's callbacks, Lightning's, yours once imported)."""
    if "." in name:
        module_name, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            raise ValueError(f"unknown callback {name!r}: cannot import {attribute} from {module_name}.") from None
    else:
        candidates = {cls.__name__: cls for cls in _subclasses(L.Callback)}
        if name not in candidates:
            known = sorted(n for n, cls in candidates.items() if not n.startswith("_") and _is_public(cls))
            raise ValueError(
                f"unknown callback {name!r}; known short names: {', '.join(known)}; give your own "
                "callback by its class path (my_package.module.MyCallback)."
            )
        found = candidates[name]
    if not (isinstance(found, type) and issubclass(found, L.Callback)):
        raise ValueError(f"{name!r} is not a lightning Callback class.")
    return found


def _subclasses(cls: type) -> Iterable[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _is_public(cls: type) -> bool:
    # compare's own recorders are added to every fit already
    if cls.__module__.startswith("lightning_assoftmax.compare"):
        return False
    return not any(part.startswith("_") for part in cls.__module__.split(".")[1:])


def _parse_one(text: str) -> Arm:
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"arm {text!r} does not parse; {_SPELLING}.") from None
    terms = [_term(node, text) for node in _terms(tree, text)]
    (loss, kwargs), callbacks = terms[0], terms[1:]
    if loss not in LOSS_NAMES:
        raise ValueError(
            f"arm {text!r}: unknown loss {loss!r}; the first term of an arm is a build_loss name: "
            f"{', '.join(LOSS_NAMES)}."
        )
    delta = None
    if loss == "as_softmax" and "delta" in kwargs:
        # as_softmax's delta belongs to the mixin (DeltaWarmup moves it), not to loss_kwargs.
        delta = kwargs.pop("delta")
    accepted = [k for k in loss_kwarg_names(loss) if k not in _MIXIN_OWNED and not (loss == "as_softmax" and k == "delta")]
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise ValueError(
            f"arm {text!r}: {loss} has no keyword {', '.join(unexpected)}; it accepts: "
            f"{', '.join(['delta'] * (loss == 'as_softmax') + accepted) or 'no keywords'}."
        )
    try:  # the values, checked by the loss itself before any fit
        build_loss(loss, **kwargs, **({"delta": delta} if delta is not None else {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"arm {text!r}: {error}") from None
    specs = []
    for name, cb_kwargs in callbacks:
        cls = resolve_callback_class(name)
        try:
            inspect.signature(cls).bind(**cb_kwargs)
            cls(**cb_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"arm {text!r}: {name}{_call_args(cb_kwargs)}: {error}") from None
        specs.append(CallbackSpec(name, cb_kwargs))
    return Arm(loss, kwargs, delta, tuple(specs))


def parse_arms(specs: str | Iterable[str]) -> list[Arm]:
    """Arms from strings (each may hold several, comma-separated); the first is the baseline.

    Every name, keyword and value is checked here (an unknown loss or callback, a keyword the
    loss does not take, a value it refuses), so that a bad arm stops the grid before its first
    fit. Duplicates are refused.
    """
    texts = [specs] if isinstance(specs, str) else list(specs)
    arms = [_parse_one(part) for text in texts for part in split_arms(text)]
    if not arms:
        raise ValueError(f"no arm given; {_SPELLING}, e.g. --arms softmax,as_softmax.")
    keys = [arm.key for arm in arms]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"arm {repeated[0]!r} is given twice; give each arm once.")
    return arms
