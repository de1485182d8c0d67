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
