"""Cache-sized blocks over logits, in the two layouts the fused kernels run on.

* *rows*: ``(M, C)`` logits with many classes; blocks are ``z[r0:r1]``.
* *columns*: ``(B, C, L)`` views with samples along ``L``; blocks are ``z[b0:b1, :, l0:l1]``.
  Channel-second logits ``(N, C, d1, ...)`` are already in this layout (no copy), and ``(M, C)``
  logits with few classes are viewed as ``z.t()[None]``: ops that reduce over 5 classes per row
  are slow, while over ``(C, samples)`` they vectorise along the samples.

In both layouts the class dimension is dim 1 of every block, and per-sample values live in a
tensor of shape :attr:`BlockLayout.row_shape` (``(M, 1)`` or ``(B, 1, L)``) whose flat order is
the order of ``target.reshape(-1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements per block: a block, its scratch buffers and the logits it reads stay in L2 cache.
BLOCK_ELEMENTS = 1 << 16
#: ``(M, C)`` logits with fewer classes than this run in the column layout.
FEW_CLASSES = 16


class BlockLayout:
    """How a logits tensor is walked block by block, and where per-sample values go."""

    def __init__(self, logits: Tensor):
        self.shape = logits.shape
        num_classes = logits.shape[1]
        self.moved = False  # rows are logits.movedim(1, -1) (a view: classes innermost in memory)
        self.transposed = False  # blocks are strided views of (M, C) logits
        if logits.dim() == 2 and num_classes >= FEW_CLASSES:
            self.columns = False
            self.z = logits.contiguous()
        elif (
            logits.dim() > 2
            and num_classes >= FEW_CLASSES
            and logits.movedim(1, -1).is_contiguous()
        ):
            # Token logits (N, L, C).transpose(1, 2): already rows in memory, no copy needed.
            self.columns = False
            self.moved = True
            self.z = logits.movedim(1, -1).reshape(-1, num_classes)
        else:
            self.columns = True
            self.transposed = logits.dim() == 2
            self.z = self.to_layout(logits)
        if self.columns:
            batch, _, length = self.z.shape
            self.num_rows = batch * length
            self.row_shape: tuple[int, ...] = (batch, 1, length)
        else:
            self.num_rows = self.z.shape[0]
            self.row_shape = (self.num_rows, 1)
        self.num_classes = num_classes
        # Blocking is for CPU caches; an accelerator wants few, large launches.
        self.block_elements = BLOCK_ELEMENTS if logits.device.type == "cpu" else None

    def to_layout(self, t: Tensor) -> Tensor:
        """A tensor shaped like the logits (e.g. a multi-label target) in the block layout."""
        if not self.columns:
            return t.movedim(1, -1).reshape(-1, self.shape[1]) if self.moved else t
        if t.dim() == 2:
            return t.t().unsqueeze(0)
        return t.reshape(t.shape[0], t.shape[1], -1)

    def to_input_layout(self, t: Tensor) -> Tensor:
        """A block-layout tensor viewed with the shape of the original logits."""
        if self.moved:
            return t.view(self.shape[:1] + self.shape[2:] + self.shape[1:2]).movedim(-1, 1)
        if self.columns and len(self.shape) == 2:
            return t[0].t()
        return t.view(self.shape)

    def new_out(self, dtype: torch.dtype) -> Tensor:
        """An uninitialised per-element buffer, contiguous in the block layout."""
        return self.z.new_empty(self.z.shape, dtype=dtype)

    def split(self, t: Tensor) -> list[Tensor]:
        """The blocks of a block-layout tensor: of the logits' layout, or of ``row_shape``.

        Blocks of both kinds correspond one to one (same samples), so the lists can be zipped.
        ``split`` makes all the views in one call, which matters when there are many blocks.
        """
        if self.block_elements is None:
            return [t]
        if not self.columns:
            step = max(1, self.block_elements // max(self.num_classes, 1))
            return [t] if self.num_rows <= step else list(t.split(step))
        batch, num_classes, length = self.z.shape
        # At least 16 samples per block so that strided reads use whole cache lines.
        span = max(16, self.block_elements // max(num_classes, 1))
        if length >= span:
            return [piece for entry in t.split(1) for piece in entry.split(span, dim=2)]
        step = max(1, span // max(length, 1))
        return [t] if batch <= step else list(t.split(step))

    def flat_positions(self, class_index: Tensor) -> Tensor:
        """Flat offsets ``(M,)`` into a contiguous block-layout buffer of one class per sample.

        For writes with ``index_put_``: ``scatter_`` on CPU bfloat16 is orders of magnitude slower.
        """
        if not self.columns:
            rows = torch.arange(self.num_rows, device=class_index.device)
            return rows * self.num_classes + class_index.reshape(-1)
        batch, num_classes, length = self.z.shape
        base = torch.arange(batch, device=class_index.device).view(batch, 1, 1) * (
            num_classes * length
        )
        base = base + torch.arange(length, device=class_index.device).view(1, 1, length)
        return (base + class_index * length).reshape(-1)

    def rows_of(self, t: Tensor, idx: Tensor) -> Tensor:
        """Rows ``(len(idx), C)`` of a block-layout tensor for flat sample indices (slow paths)."""
        if not self.columns:
            return t[idx]
        length = t.shape[2]
        return t[idx // length, :, idx % length]

    def set_rows(self, t: Tensor, idx: Tensor, rows: Tensor | float) -> None:
        """Write rows ``(len(idx), C)`` (or a number) into a block-layout tensor."""
        if not self.columns:
            t[idx] = rows
        else:
            length = t.shape[2]
            t[idx // length, :, idx % length] = rows


def scratch(
    buffers: dict, name: str, shape: torch.Size, like: Tensor, dtype: torch.dtype
) -> Tensor:
    """A contiguous ``shape`` buffer reused across blocks of the same shape (cached in ``buffers``)."""
    key = (name, shape)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = like.new_empty(shape, dtype=dtype)
    return buffer


def scale_rows(out: Tensor, scale: Tensor) -> Tensor:
    """``out * scale`` for a per-row ``scale``, in place unless autograd keeps the graph.

    Without ``retain_graph`` the saved buffer is dead after backward, so it is scaled in place,
    as donated buffers are in compiled autograd, instead of allocating a second (rows, C) tensor.
    A bfloat16 buffer is scaled by a bfloat16 factor: mixed-dtype elementwise ops take a slow path
    on CPU, and bfloat16 has float32's range.
    """
    if out.dtype == torch.bfloat16:
        scale = scale.to(out.dtype)
    return out * scale if graph_is_kept() else out.mul_(scale)


def graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``).

    When it does not, a custom backward may overwrite the buffers it saved, as compiled autograd
    does with donated buffers. Outside a backward pass (or on an older torch) the answer is True.
    """
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())
