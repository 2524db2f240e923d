"""Host-side checks of the fused paged write's arguments, in one place.

The callers that validate the fused write (``kernels/paged_write.cl``) themselves before they
launch it on their own buffers share these: :meth:`kvcl.engine.PagedKVCache.write_qkv` and
``attend_qkv``, :class:`kvcl.stepcalls.StepCalls`, and the ferrum mirror's ``paged_write`` /
``contig_write`` (:mod:`kvcl.ferrum.kinds`). :func:`kvcl.ops.paged_write.paged_write_qkv`
checks its device arrays itself (it takes nothing else).

Each check names the argument and raises one of kvcl's errors before anything is written.
No pyopencl import: device arrays are recognised by duck typing (:mod:`kvcl.validate`), and
``context`` is only compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgument, ShapeError
from ..reference.paged_write import ROPE_MODES
from ..validate import check_array, check_int

__all__ = ["ROPE_MODES", "check_rope", "check_q_heads", "qkv_width", "check_rope_tables",
           "check_table_rows", "check_norm_weights"]


def check_rope(rope: Any) -> str:
    """``rope`` if it is one of :data:`ROPE_MODES` (``"none"``, ``"half"``, ``"interleaved"``)."""
    if not isinstance(rope, str) or rope not in ROPE_MODES:
        raise InvalidArgument(f"rope: expected one of {', '.join(ROPE_MODES)}, got {rope!r}")
    return rope


def check_q_heads(num_q_heads: Any, num_kv_heads: int) -> int:
    """``num_q_heads`` as an int: at least 1 and a multiple of ``num_kv_heads`` (GQA)."""
    hq = check_int("num_q_heads", num_q_heads, low=1)
    if hq % num_kv_heads:
        raise InvalidArgument(f"num_q_heads: expected a multiple of num_kv_heads={num_kv_heads}, got {hq}")
    return hq


def qkv_width(num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Floats per token of packed QKV: all Q heads, then the K heads, then the V heads."""
    return (num_q_heads + 2 * num_kv_heads) * head_dim


def check_table_rows(tables: dict, rows: int, why: str) -> None:
    """Every table of ``{"cos": t, "sin": t}`` (None: absent) has at least ``rows`` rows, the
    positions the write reads (``why`` says which, for the message)."""
    for name, t in tables.items():
        if t is not None and t.shape[0] < rows:
            raise ShapeError(f"{name}: expected at least {rows} rows ({why}), got {t.shape[0]}")


def check_rope_tables(cos: Any, sin: Any, *, rope: str, head_dim: int, context: Any,
                      required_for: "str | None" = None, rows: int = 0, why: str = "") -> dict:
    """``{"cos": cos, "sin": sin}`` checked for RoPE mode ``rope`` (both None for ``"none"``).

    Each table: float32 ``[max_position, head_dim / 2]``, finite (host arrays), on ``context``
    (device arrays), at least ``rows`` rows (see :func:`check_table_rows`). A missing table is
    refused, naming ``required_for`` (default ``rope='<mode>'``).
    """
    if rope == "none":
        return {"cos": None, "sin": None}
    tables = {"cos": cos, "sin": sin}
    for name, t in tables.items():
        if t is None:
            raise InvalidArgument(f"{name}: required for {required_for or f'rope={rope!r}'}")
        check_array(name, t, shape=(None, head_dim // 2), dtype=np.float32, context=context, finite=True)
    check_table_rows(tables, rows, why)
    return tables


def check_norm_weights(q_weight: Any, k_weight: Any, *, head_dim: int, context: Any,
                       names: tuple = ("q_norm_weight", "k_norm_weight"),
                       required_for: "str | None" = None) -> dict:
    """``{names[0]: q_weight, names[1]: k_weight}`` checked: each float32 ``[head_dim]``, finite
    (host arrays), on ``context``. None means no RMS norm of those heads, unless
    ``required_for`` names what needs both (then None is refused)."""
    weights = dict(zip(names, (q_weight, k_weight)))
    for name, w in weights.items():
        if w is None:
            if required_for:
                raise InvalidArgument(f"{name}: required for {required_for}")
            continue
        check_array(name, w, shape=(head_dim,), dtype=np.float32, context=context, finite=True)
    return weights
