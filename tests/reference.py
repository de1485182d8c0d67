"""Slow, plain-PyTorch references for the tests (independent of the package's implementation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_keep_mask(logits: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Rows ``(M, C)`` and ``(M,)`` valid targets: keep iff p_t - p_i <= delta, target always."""
    p = torch.softmax(logits.float(), dim=1)
    p_t = p.gather(1, target[:, None])
    keep = (p_t - p) <= delta
    keep[torch.arange(len(target)), target] = True
    return keep


def reference_as_softmax(
    logits: torch.Tensor,
    target: torch.Tensor,
    delta: float,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Full softmax, boolean mask, masked F.cross_entropy — the obvious slow implementation."""
    num_classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, num_classes)
    flat_target = target.reshape(-1)
    valid = flat_target != ignore_index
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    losses = torch.zeros(len(flat_target), dtype=compute)
    if valid.any():
        z = rows[valid].to(compute)
        t = flat_target[valid]
        keep = reference_keep_mask(z.detach(), t, delta)
        masked = z.masked_fill(~keep, float("-inf"))
        losses = losses.index_put((valid.nonzero().squeeze(1),), F.cross_entropy(masked, t, reduction="none"))
    if reduction == "none":
        return losses.reshape(target.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(int(valid.sum()), 1)


def reference_multilabel(logits: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Per-row multi-label AS-Softmax loss written with Python loops over rows."""
    out = []
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for s, y in zip(logits.to(compute), target.bool(), strict=True):
        p = torch.softmax(s.detach(), dim=0)
        pos, neg = y, ~y
        keep_neg = neg.clone()
        keep_pos = pos.clone()
        if pos.any() and neg.any():
            keep_neg = neg & ((p[pos].min() - p) <= delta)
            keep_pos = pos & ((p - p[neg].max()) <= delta)
        zero = s.new_zeros(1)
        neg_term = torch.logsumexp(torch.cat([zero, s[keep_neg]]), dim=0)
        pos_term = torch.logsumexp(torch.cat([zero, -s[keep_pos]]), dim=0)
        out.append(neg_term + pos_term)
    return torch.stack(out) if out else logits.new_zeros(0, dtype=compute)


def ignore_rows_near_the_boundary(
    logits: torch.Tensor, target: torch.Tensor, delta: float, margin: float, ignore_index: int = -100
) -> torch.Tensor:
    """``target`` (rows ``(M, C)``, ``(M,)``) with ``ignore_index`` wherever some class's
    ``p_t - p_i`` lies within ``margin`` of ``delta`` (in float64): rounding the logits to a lower
    precision may flip such a keep decision, so a comparison across precisions skips those rows."""
    p = torch.softmax(logits.detach().double(), dim=1)
    valid = target != ignore_index
    p_t = p.gather(1, torch.where(valid, target, 0)[:, None])
    near = ((p_t - p) - delta).abs() < margin
    near.scatter_(1, torch.where(valid, target, 0)[:, None], False)
    return torch.where(near.any(1) & valid, torch.full_like(target, ignore_index), target)


def reference_single_label_masked(
    logits: torch.Tensor, target: torch.Tensor, delta: float, ignore_index: int = -100
) -> torch.Tensor:
    """The paper's masked samples of rows ``(M, C)``: non-ignored rows whose only kept class is
    the target (``p_t - p_i <= delta`` in float64 of the given values), ``(M,)`` bool."""
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    keep = reference_keep_mask(logits.detach().double(), safe, delta)
    return valid & (keep.sum(1) == 1)


def reference_multilabel_masked(logits: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Multi-label rows whose every term (positive and negative) is masked, ``(M,)`` bool."""
    out = []
    for s, y in zip(logits.detach().double(), target.bool(), strict=True):
        p = torch.softmax(s, dim=0)
        pos, neg = y, ~y
        if not (pos.any() and neg.any()):
            out.append(False)  # a one-sided row keeps all its terms
            continue
        keep_neg = neg & ((p[pos].min() - p) <= delta)
        keep_pos = pos & ((p - p[neg].max()) <= delta)
        out.append(not (keep_neg.any() or keep_pos.any()))
    return torch.tensor(out, dtype=torch.bool)


#: Settings under which each large-margin loss differs clearly from plain softmax on a few classes.
MARGIN_KWARGS = {
    "am_softmax": {"scale": 8.0, "margin": 0.3},
    "cosface": {"scale": 8.0, "margin": 0.3},
    "normface": {"scale": 8.0},
    "arcface": {"scale": 8.0, "margin": 0.5},
    "l_softmax": {"margin": 3, "lam": 0.5},
    "sphereface": {"margin": 4, "lam": 0.0},
    "l2_softmax": {"alpha": 4.0},
}


def reference_margin_logits(name: str, features: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, target: torch.Tensor, **kw) -> torch.Tensor:
    """The logits a large-margin loss takes cross entropy of, from the papers' formulas (rows
    ``(M, d)`` of valid targets, class weights ``(C, d)``)."""
    import math

    rows = torch.arange(len(target))
    x, t = features, target
    if name in ("am_softmax", "cosface", "normface", "arcface"):
        cosine = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
        out = cosine.clone()
        if name in ("am_softmax", "cosface"):
            out[rows, t] = cosine[rows, t] - kw["margin"]
        elif name == "arcface":
            theta = torch.acos(cosine[rows, t].clamp(-1, 1))
            m = kw["margin"]
            out[rows, t] = torch.where(theta + m <= math.pi, torch.cos(theta + m), cosine[rows, t] - m * math.sin(m))
        return kw["scale"] * out
    if name in ("l_softmax", "sphereface"):
        w = weight if name == "l_softmax" else F.normalize(weight, dim=1)
        logits = x @ w.T
        magnitude = x.norm(dim=1) * w[t].norm(dim=1)
        theta = torch.acos((logits[rows, t] / magnitude).clamp(-1, 1))
        m, lam = kw["margin"], kw["lam"]
        k = torch.floor(theta.detach() * m / math.pi)
        psi = (-1.0) ** k * torch.cos(m * theta) - 2 * k
        out = logits.clone()
        out[rows, t] = (lam * logits[rows, t] + magnitude * psi) / (1 + lam)
        return out
    if name == "l2_softmax":
        return kw["alpha"] * (F.normalize(x, dim=1) @ weight.T + bias)
    raise AssertionError(name)
