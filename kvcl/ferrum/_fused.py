"""The fused write of the ferrum mirror (``paged_write`` / ``contig_write``), after the trait's
argument checks: the checks of the inputs (:mod:`kvcl.ops.write_checks`), their upload, the
slots, one launch of :func:`kvcl.ops.paged_write.paged_write_qkv` and its device status.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla

from ..errors import KvclError, NonFiniteError
from ..ops import paged_write as write_ops
from ..ops import write_checks as checks
from ..validate import is_device_array
from . import _io
from ..ops._launch import to_host


def write(kind, layer, qkv, q_norm_w, k_norm_w, cos, sin, q_out, tokens, num_q_heads, pos_offset,
          eps, qk_mode, *, norm_rope, slot_start, pools, block_size, table):
    """Validate the rest, upload, launch the fused write, raise on a device-side error.

    ``kind`` is the layer's :class:`~kvcl.ferrum.kinds.KvLayer` class, ``norm_rope`` its
    ``QK_MODES[qk_mode]``; ``tokens`` to ``qk_mode`` were checked by ``KvLayer._write_args``,
    ``pools`` by ``KvLayer._pools``. ``slot_start`` None: paged (token ``t``'s slot from
    ``table``, the host copy of the block-table entries the write uses, at position
    ``pos_offset + t``); else contiguous, row ``slot_start + t`` of one block of
    ``block_size`` = capacity slots.
    """
    D, hkv = layer.head_dim, layer.num_kv_heads
    hq = num_q_heads
    norm, rope = norm_rope
    like_device = is_device_array(qkv)
    qkv_dev = _io.as_input("qkv", qkv, (tokens, checks.qkv_width(hq, hkv, D)), layer)
    q_dev, q_target = _io.as_output("q_out", q_out, (tokens, hq, D), layer,
                                    like_device=like_device)
    end_pos = pos_offset + tokens
    context = layer.device.context
    tables = checks.check_rope_tables(cos, sin, rope=rope, head_dim=D, context=context,
                                      required_for=f"qk_mode {qk_mode}", rows=end_pos,
                                      why=f"positions up to {end_pos - 1}")
    tables = {n: None if t is None else _io.as_input(n, t, tuple(t.shape), layer)
              for n, t in tables.items()}
    weights = {"q": None, "k": None}
    if norm:
        checked = checks.check_norm_weights(q_norm_w, k_norm_w, head_dim=D, context=context,
                                            names=("q_norm_w", "k_norm_w"),
                                            required_for="qk_mode 1 (RMS qk-norm)")
        weights = {key: _io.as_input(name, w, (D,), layer)
                   for key, (name, w) in zip("qk", checked.items())}
    k_pool, v_pool, k_scales, v_scales = pools
    # nothing has been written yet; every argument is valid from here on
    positions = np.arange(pos_offset, end_pos, dtype=np.int64)
    rows = positions if slot_start is None else np.arange(slot_start, slot_start + tokens)
    if table is None:  # contiguous: the cache is one block of `capacity` slots
        slots = rows
    else:
        first = (rows[0] // block_size) if tokens else 0
        slots = table[rows // block_size - first] * block_size + rows % block_size
    slot_dev, pos_dev = _io.upload_ints(layer, slots, positions)
    status = cla.zeros(layer.device.queue, 1, np.int32)
    write_ops.paged_write_qkv(
        qkv_dev, slot_dev, pos_dev, k_pool, v_pool, q_dev, num_q_heads=hq, num_kv_heads=hkv,
        head_dim=D, block_size=block_size, kv_dtype=kind._STORAGE, int8_mode=kind._INT8_MODE,
        k_scales=k_scales, v_scales=v_scales, cos=tables["cos"], sin=tables["sin"],
        q_norm_weight=weights["q"], k_norm_weight=weights["k"], eps=eps, rope=rope,
        status=status, queue=layer.device.queue)
    code = int(to_host(status)[0])
    if code & write_ops.STATUS_NONFINITE:
        raise NonFiniteError("qkv: a K or V row was NaN/Inf after norm and RoPE; that row was "
                             "not written (its slot kept its previous contents)")
    if code:  # pragma: no cover - positions and slots were validated above
        raise KvclError(f"paged write: unexpected device status {code}")
    return _io.finish_output(q_dev, q_target, q_out)
