r"""Output layers of the large-margin losses that need more than a plain ``nn.Linear``.

- :class:`NormPreservingClassifier`: the bias-free linear layer of L-Softmax,
  :math:`z_j = W_j^\top x = \|W_j\|\,\|x\|\cos\theta_j`, or, with ``normalize_weights=True``,
  SphereFace's :math:`z_j = \|x\|\cos\theta_j` (unit class weights). Those are the margin-free
  logits (their argmax is the prediction), but the margin of these two losses,
  :math:`\|W_t\|\,\|x\|\,\psi(\theta_t)`, needs the norms as well, and ``C`` logits cannot hold
  ``C`` products *and* the norm of ``x``. So the layer returns :class:`NormedLogits`: an ordinary
  ``(..., C)`` tensor of the margin-free logits that also carries ``feature_norm`` and
  ``weight_norm``. Every torch operation on it returns a plain tensor, except the layout
  operations a model applies between its head and the loss (``transpose``, ``permute``,
  ``movedim``, ``swapaxes``, ``contiguous`` and dtype/device casts), which move the norms along,
  so ``(N, L, C)`` token logits still reach the loss as ``(N, C, L)``.
- :class:`NormalizedFeatureClassifier`: a linear layer over unit-norm features, the head of the
  L2-constrained softmax (the loss scales its output by :math:`\alpha`).

The cosine head of ``am_softmax``/``cosface``/``normface``/``arcface`` is
:class:`~lightning_assoftmax.family.CosineClassifier`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_assoftmax.ops import compute_dtype

__all__ = ["NormPreservingClassifier", "NormalizedFeatureClassifier", "NormedLogits"]

# Operations that only move or cast the logits: applied to the carried norms too.
_LAYOUT_OPS = frozenset(
    {
        Tensor.transpose,
        torch.transpose,
        Tensor.permute,
        torch.permute,
        Tensor.movedim,
        torch.movedim,
        Tensor.swapaxes,
        torch.swapaxes,
        Tensor.contiguous,
        Tensor.to,
        Tensor.float,
        Tensor.double,
        Tensor.half,
        Tensor.bfloat16,
        Tensor.cpu,
        Tensor.cuda,
    }
)


class NormedLogits(Tensor):
    """Margin-free logits ``(..., C)`` that carry the norms a multiplicative angular margin needs.

    Attributes:
        feature_norm: :math:`\\|x\\|`, shaped like the logits with a class dimension of size 1.
        weight_norm: :math:`\\|W_j\\|`, of size ``C`` along the class dimension and 1 elsewhere;
            ``None`` when the class weights are unit vectors.

    Build one with :meth:`wrap`. Operations other than the layout ones listed in the module
    docstring return plain tensors (the norms would no longer describe them).
    """

    feature_norm: Tensor
    weight_norm: Tensor | None

    @staticmethod
    def wrap(logits: Tensor, feature_norm: Tensor, weight_norm: Tensor | None) -> NormedLogits:
        """``logits`` (still attached to the autograd graph) carrying the two norms."""
        out = logits.as_subclass(NormedLogits)
        out.feature_norm = feature_norm
        out.weight_norm = weight_norm
        return out

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if func not in _LAYOUT_OPS or not args or not isinstance(args[0], NormedLogits):
                return out
            if not isinstance(out, Tensor) or out is args[0]:
                return out
            carrier = args[0]
            feature_norm = func(carrier.feature_norm, *args[1:], **kwargs)
            weight_norm = None if carrier.weight_norm is None else func(carrier.weight_norm, *args[1:], **kwargs)
        return NormedLogits.wrap(out, feature_norm, weight_norm)


class NormPreservingClassifier(nn.Module):
    r"""Bias-free linear classifier ``(..., in_features) -> (..., num_classes)`` returning
    :class:`NormedLogits` (the head of ``l_softmax`` and, with ``normalize_weights``, ``sphereface``).

    Outputs :math:`z_j = W_j^\top x` (L-Softmax, Liu et al. 2016, which drops the bias), or
    :math:`\|x\|\cos\theta_j` with unit-normalised class weights (A-Softmax, Liu et al. 2017).
    The norms are computed in at least float32.

    Example:
        >>> import torch
        >>> head = NormPreservingClassifier(4, 3)
        >>> x = torch.randn(2, 4)
        >>> logits = head(x)
        >>> torch.allclose(logits, x @ head.weight.T), logits.feature_norm.shape, logits.weight_norm.shape
        (True, torch.Size([2, 1]), torch.Size([1, 3]))
    """

    def __init__(self, in_features: int, num_classes: int, normalize_weights: bool = False) -> None:
        super().__init__()
        _check_sizes(type(self).__name__, in_features, num_classes)
        if not isinstance(normalize_weights, bool):
            raise TypeError(f"normalize_weights must be True or False, got {normalize_weights!r}.")
        self.in_features = in_features
        self.num_classes = num_classes
        self.normalize_weights = normalize_weights
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's start

    def forward(self, features: Tensor) -> NormedLogits:
        norm_dtype = compute_dtype(features.dtype)
        weight = F.normalize(self.weight, dim=-1) if self.normalize_weights else self.weight
        logits = F.linear(features, weight)
        feature_norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True, dtype=norm_dtype)
        weight_norm = None
        if not self.normalize_weights:
            weight_norm = torch.linalg.vector_norm(self.weight, dim=-1, dtype=norm_dtype)
            weight_norm = weight_norm.reshape((1,) * (logits.dim() - 1) + (-1,))
        return NormedLogits.wrap(logits, feature_norm, weight_norm)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"normalize_weights={self.normalize_weights}"
        )


class NormalizedFeatureClassifier(nn.Linear):
    r"""``nn.Linear`` over L2-normalised features: :math:`W \hat x + b` (the head of ``l2_softmax``).

    The L2-constrained softmax (Ranjan et al., arXiv 1703.09507) feeds features of norm
    :math:`\alpha` to the last linear layer; here the layer sees unit features and the loss
    multiplies its output by :math:`\alpha`, which is :math:`W(\alpha\hat x) + \alpha b`: the
    same model (the bias is learned as :math:`\alpha b`; without a bias the two are identical).

    Example:
        >>> import torch
        >>> head = NormalizedFeatureClassifier(4, 3, bias=False)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(head(10 * x), head(x))
        True
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        _check_sizes(type(self).__name__, in_features, num_classes)
        super().__init__(in_features, num_classes, bias=bias)

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(F.normalize(features, dim=-1))


def _check_sizes(owner: str, in_features: int, num_classes: int) -> None:
    for what, value in (("in_features", in_features), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {what} must be a positive int, got {value!r}.")
