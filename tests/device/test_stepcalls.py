"""StepCalls (the per-layer hot path) and the inline companion device.

* ``StepCalls.attend_qkv`` / ``write_attend`` are bit-identical to the engine's
  ``attend_qkv`` / ``write`` + ``attend`` on twin caches, every dtype, inline and not, with
  derived layers, rebinding to later steps and ragged batches;
* bad input is refused with the cache byte-identical;
* steps run on PoCL's in-thread companion when small, on the device's queue when large, and
  mixing the two (a prefill on the worker threads, decode in-thread, a read-back) agrees with
  the numpy reference.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import kvcl

from kvcl.engine import PagedKVCache, StaleStepError, inline_max_work
from kvcl.errors import DtypeError, InvalidArgument, KvclError, NonFiniteError, ShapeError
from kvcl.reference.decode_attention import _attend as reference_attend

DTYPES = list(kvcl.KV_DTYPES)
HKV, D, HQ, LAYERS = 2, 32, 4, 3


def _tables(n=256):
    pos = np.arange(n, dtype=np.float64)[:, None]
    inv = 10000.0 ** (-np.arange(0, D, 2) / D)
    return np.cos(pos * inv).astype(np.float32), np.sin(pos * inv).astype(np.float32)


def _twins(device, dtype, inline, prefill=(21, 7)):
    """Two caches with the same prefill (and the same sequence ids)."""
    caches = []
    for _ in range(2):
        c = PagedKVCache(LAYERS, HKV, D, 32, 8, dtype, device=device)
        c.inline_max_work = (1 << 40) if inline else 0
        seqs = [c.add_sequence() for _ in prefill]
        rng = np.random.default_rng(1)
        st = c.plan(seqs, list(prefill))
        for layer in range(LAYERS):
            c.write(layer, st, rng.standard_normal((sum(prefill), HKV, D), np.float32),
                    rng.standard_normal((sum(prefill), HKV, D), np.float32))
        caches.append((c, seqs))
    return caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inline", [False, True])
def test_attend_qkv_bit_identical(device, dtype, inline):
    (a, sa), (b, sb) = _twins(device, dtype, inline)
    cos, sin = _tables()
    rng = np.random.default_rng(2)
    calls = None
    for counts in ([1, 1], [3, 1], [1, 2]):        # decode, a ragged chunk, and back
        qkv = rng.standard_normal((sum(counts), (HQ + 2 * HKV) * D), np.float32)
        st_a, st_b = a.plan(sa, counts), b.plan(sb, counts)
        assert st_b.inline == (inline and device.inline_queue is not None)
        calls = b.step_calls(st_b, num_q_heads=HQ, rope="half", cos=cos, sin=sin) if calls is None \
            else calls.rebind(st_b)
        for layer in (2, 0, 1):                     # derived layers, in any order
            want = a.attend_qkv(layer, st_a, qkv, num_q_heads=HQ, rope="half", cos=cos, sin=sin)
            got = calls.attend_qkv(layer, qkv)
            assert got.shape == (sum(counts), HQ, D)
            np.testing.assert_array_equal(got, want)
    assert a.snapshot() == b.snapshot()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inline", [False, True])
def test_write_attend_bit_identical(device, dtype, inline):
    (a, sa), (b, sb) = _twins(device, dtype, inline)
    rng = np.random.default_rng(3)
    for counts in ([1, 1], [2, 3]):
        t = sum(counts)
        k, v = (rng.standard_normal((t, HKV, D), np.float32) for _ in range(2))
        q = rng.standard_normal((t, HQ, D), np.float32)
        st_a, st_b = a.plan(sa, counts), b.plan(sb, counts)
        calls = b.step_calls(st_b, num_q_heads=HQ, scale=0.3, window=9)
        out = np.empty((t, HQ, D), np.float32)
        for layer in range(LAYERS):
            a.write(layer, st_a, k, v)
            want = a.attend(layer, st_a, q, scale=0.3, window=9)
            got = calls.write_attend(layer, k, v, q, out=out)
            assert got is out
            np.testing.assert_array_equal(got, want)
    assert a.snapshot() == b.snapshot()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepared_steps_bit_identical(device, dtype, monkeypatch):
    """``rebind(step, prepare=True)`` readies every layer before the calls: layer 0's argument
    changes are carried to the others, which must hold for decode steps across block
    boundaries, a ragged chunk, a layer left out of a step (readied in full after), calls in
    any order, a switch of queue (other kernels) mid-way, and a step that outgrows the tables'
    buffer; both kinds of call. A decode step after another reuses the last step's launches and
    takes the other layers' as the last prepare left them."""
    from kvcl.stepcalls import StepCalls
    followed, reused, as_left = [], [], []
    follow, last, unchanged = StepCalls._follow, StepCalls._last_launches, StepCalls._unchanged
    monkeypatch.setattr(StepCalls, "_follow", lambda self, *a: followed.append(follow(self, *a)) or followed[-1])
    monkeypatch.setattr(StepCalls, "_last_launches", lambda self, *a: reused.append(last(self, *a)) or reused[-1])
    monkeypatch.setattr(StepCalls, "_unchanged", lambda self, *a: as_left.append(unchanged(self, *a)) or as_left[-1])
    (a, sa), (b, sb) = _twins(device, dtype, True)
    cos, sin = _tables()
    rng = np.random.default_rng(4)
    qkv_calls = kv_calls = None
    schedule = [[1, 1]] * 3 + [[3, 1]] + [[1, 1]] * 6 + [None] + [[1, 1]] * 2
    for n, counts in enumerate(schedule):
        if n == 10:   # more slots than the tables' buffer holds (it grows; its size follows the alignment)
            buffers = [c._meta_buf for c in (qkv_calls, kv_calls)]
            counts = [max(c._meta_caps[0] for c in (qkv_calls, kv_calls)), 1]
            assert counts[0] + 64 < 256, "the cache and the tables hold 256 positions"
        t = sum(counts)
        if n == 5:   # the in-thread queue's own kernels, before the steps on the device's queue
            before = [{k: v[0] for k, v in c._own.items()} for c in (qkv_calls, kv_calls)]
        if n == 8:   # back on the in-thread queue for step 7: it used the same kernel objects again
            for c, kept in zip((qkv_calls, kv_calls), before):
                assert all(c._own[k][0] is kernel for k, kernel in kept.items())
                if device.inline_queue is not None:   # steps 5-6 made the other queue's
                    assert len(c._own) > len(kept)
        b.inline_max_work = 0 if n in (5, 6) else (1 << 40)   # steps 5-6 on the device's own queue
        st_a, st_b = a.plan(sa, counts), b.plan(sb, counts)
        if qkv_calls is None:
            qkv_calls = b.step_calls(st_b, num_q_heads=HQ, rope="half", cos=cos, sin=sin)
            kv_calls = b.step_calls(st_b, num_q_heads=HQ, scale=0.3)
        else:
            qkv_calls.rebind(st_b, prepare=True)
            kv_calls.rebind(st_b, prepare=True)
        layers = [2, 0, 1] if n == 7 else [0, 2] if n == 3 else list(range(LAYERS))
        for layer in layers:
            qkv = rng.standard_normal((t, (HQ + 2 * HKV) * D), np.float32)
            want = a.attend_qkv(layer, st_a, qkv, num_q_heads=HQ, rope="half", cos=cos, sin=sin)
            np.testing.assert_array_equal(qkv_calls.attend_qkv(layer, qkv), want, err_msg=f"qkv step {n} layer {layer}")
        for layer in layers:
            k, v = (rng.standard_normal((t, HKV, D), np.float32) for _ in range(2))
            q = rng.standard_normal((t, HQ, D), np.float32)
            a.write(layer, st_a, k, v)
            want = a.attend(layer, st_a, q, scale=0.3)
            np.testing.assert_array_equal(kv_calls.write_attend(layer, k, v, q), want, err_msg=f"kv step {n} layer {layer}")
        if n == 10:
            assert all(c._meta_buf is not buf for c, buf in zip((qkv_calls, kv_calls), buffers))
        if n in (2, 12):   # a decode step after a decode step: both kinds' launches were the last step's
            assert [found is not None for _, found in reused[-2:]] == [True, True], f"step {n}"
            assert as_left[-2:] == [True, True], f"step {n}"
        if n in (4, 10, 11):   # the number of tokens changed: planned anew
            assert [found for _, found in reused[-2:]] == [None, None], f"step {n}"
            assert as_left[-2:] == [False, False], f"step {n}"
    assert a.snapshot() == b.snapshot()
    assert True in followed and False in followed   # both ways of readying a layer ran


def test_scalar_arguments_without_the_ctypes_route(device, monkeypatch):
    """set_arg sets numpy scalars through clSetKernelArg when it finds the library, else
    through pyopencl: a kernel reads the same value both ways."""
    import pyopencl as cl
    from kvcl.ops import _launch
    prg = cl.Program(device.context, "__kernel void f(__global int* o, int a, float b) "
                     "{ o[0] = a; o[1] = (int)(b * 4.0f); }").build()
    out = cl.Buffer(device.context, cl.mem_flags.READ_WRITE, 8)
    for route in ("ctypes", "pyopencl"):
        if route == "pyopencl":
            monkeypatch.setattr(_launch, "_CL_SET_ARG", [None])
        k = cl.Kernel(prg, "f")
        k.set_arg(0, out)
        _launch.set_arg(k, 1, np.int32(-7))
        _launch.set_arg(k, 2, np.float32(2.5))
        cl.enqueue_nd_range_kernel(device.queue, k, (1,), None)
        host = np.zeros(2, np.int32)
        cl.enqueue_copy(device.queue, host, out)
        assert host.tolist() == [-7, 10], route
        if route == "ctypes" and sys.platform.startswith("linux"):
            assert _launch._cl_set_kernel_arg() is not None   # found the library pyopencl loaded
    with pytest.raises(cl.Error):   # a bad index is pyopencl's error either way
        _launch.set_arg(k, 9, np.int32(1))


def test_refusals_change_nothing(device):
    ((c, seqs),) = _twins(device, "int8", True)[:1]
    st = c.plan(seqs, [1, 1])
    cos, sin = _tables()
    calls = c.step_calls(st, num_q_heads=HQ, rope="half", cos=cos, sin=sin)
    before = c.snapshot()
    good = np.zeros((2, (HQ + 2 * HKV) * D), np.float32)
    nan = good.copy()
    nan[1, 5] = np.nan
    inf = good.copy()
    inf[0, 3] = np.inf
    infs = good.copy()
    infs[0, 1], infs[1, 2] = np.inf, -np.inf
    kv = np.zeros((2, HKV, D), np.float32)
    q_nan = np.zeros((2, HQ, D), np.float32)
    q_nan[1, 2, 3] = np.nan
    bad = [
        (lambda: calls.attend_qkv(0, inf), NonFiniteError, "qkv"),
        (lambda: calls.attend_qkv(0, infs), NonFiniteError, "qkv"),
        (lambda: calls.write_attend(0, kv, kv, q_nan), NonFiniteError, "queries"),   # after keys and values
        (lambda: calls.attend_qkv(0, good[:1]), ShapeError, "qkv"),
        (lambda: calls.attend_qkv(0, good.astype(np.float64)), DtypeError, "qkv"),
        (lambda: calls.attend_qkv(0, nan), NonFiniteError, "qkv"),
        (lambda: calls.attend_qkv(0, [[0.0]]), DtypeError, "qkv"),
        (lambda: calls.attend_qkv(LAYERS, good), KvclError, "layer"),
        (lambda: calls.attend_qkv(-1, good), KvclError, "layer"),
        (lambda: calls.attend_qkv(0, good, out=np.zeros((2, HQ, D + 1), np.float32)), ShapeError, "out"),
        (lambda: calls.write_attend(0, good, good, good), ShapeError, "keys"),
        (lambda: c.step_calls(st, num_q_heads=3), InvalidArgument, "num_q_heads"),
        (lambda: c.step_calls(st, num_q_heads=HQ, rope="spiral"), InvalidArgument, "rope"),
        (lambda: c.step_calls(st, num_q_heads=HQ, rope="half", cos=cos[:, :3], sin=sin), ShapeError, "cos"),
        (lambda: c.step_calls(st, num_q_heads=HQ, rope="half", cos=cos[:10], sin=sin[:10]), ShapeError, "cos"),
        (lambda: c.step_calls("step", num_q_heads=HQ), DtypeError, "step"),
    ]
    for call, err, name in bad:
        with pytest.raises(err, match=name):
            call()
        assert c.snapshot() == before, name
    # a stale step: one of its sequences planned again
    c.plan(seqs[:1], [1])
    before = c.snapshot()
    with pytest.raises(StaleStepError):
        calls.attend_qkv(0, good)
    assert c.snapshot() == before


def test_device_arrays_refused(device):
    import pyopencl.array as cla
    ((c, seqs),) = _twins(device, "fp32", False)[:1]
    st = c.plan(seqs, [1, 1])
    calls = c.step_calls(st, num_q_heads=HQ)
    x = cla.zeros(device.queue, (2, HKV, D), np.float32)
    with pytest.raises(InvalidArgument, match="numpy"):
        calls.write_attend(0, x, x, cla.zeros(device.queue, (2, HQ, D), np.float32))


def test_inline_companion_and_mixed_queues(device):
    """A long prefill on the device's queue, short decode steps in-thread, a long step again,
    and a read-back: every output equals the numpy reference of the stored K/V."""
    c = PagedKVCache(1, HKV, D, 64, 8, "fp32", device=device)
    companion = device.inline_queue is not None        # PoCL only; elsewhere every step is on the queue
    c.inline_max_work = 40 * 2 * HKV * D            # steps over 40 cached tokens go to the workers
    s = c.add_sequence()
    rng = np.random.default_rng(4)
    ks, vs = [], []
    for n, inline in ((30, False), (1, True), (1, True), (20, False), (1, False)):
        # prefill of 30 attends 30 x 30 / 2 tokens: the workers; then 31, 32 tokens in-thread;
        # 20 more new tokens over 52: the workers; 53 > 40: the workers
        st = c.plan([s], [n])
        assert st.inline == (inline and companion), (n, st.inline)
        k, v = (rng.standard_normal((n, HKV, D), np.float32) for _ in range(2))
        q = rng.standard_normal((n, HQ, D), np.float32)
        ks.append(k)
        vs.append(v)
        out = c.step_calls(st, num_q_heads=HQ).write_attend(0, k, v, q)
        K, V = np.concatenate(ks), np.concatenate(vs)
        want = reference_attend(q, K, V, 1.0 / np.sqrt(D), 0)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    k_back, v_back = c.read(0, s)
    np.testing.assert_array_equal(k_back, np.concatenate(ks))
    np.testing.assert_array_equal(v_back, np.concatenate(vs))


def test_inline_max_work_formula():
    assert inline_max_work(1) >= 1 << 60              # one core: the workers never win
    two, many = inline_max_work(2), inline_max_work(64)
    assert two == 2 * inline_max_work(10 ** 9) and many < two


def test_companion_not_listed():
    import kvcl
    names = [d.name.lower() for d in kvcl.devices()]
    assert not any(n.startswith("basic") for n in names), names


@pytest.mark.parametrize("inline", [False, True])
def test_copy_false_results_in_its_own_array(device, inline):
    """``copy=False`` gives the same results as ``copy=True``, in an array of the StepCalls'
    own that its next call overwrites (the ONNX bridge's path: onnxruntime copies it at once)."""
    (a, sa), (b, sb) = _twins(device, "fp32", inline)
    cos, sin = _tables()
    rng = np.random.default_rng(4)
    st_a, st_b = a.plan(sa, [1, 1]), b.plan(sb, [1, 1])
    ca = a.step_calls(st_a, num_q_heads=HQ, rope="half", cos=cos, sin=sin)
    cb = b.step_calls(st_b, num_q_heads=HQ, rope="half", cos=cos, sin=sin)
    last = None
    for layer in range(LAYERS):
        qkv = rng.standard_normal((2, (HQ + 2 * HKV) * D), np.float32)
        want = ca.attend_qkv(layer, qkv)
        got = cb.attend_qkv(layer, qkv, copy=False)
        np.testing.assert_array_equal(got, want)
        assert not np.shares_memory(got, qkv) and not np.shares_memory(want, got)
        if last is not None:
            assert np.shares_memory(got, last)     # one array, reused
        last = got
    st_a, st_b = a.plan(sa, [1, 1]), b.plan(sb, [1, 1])
    ca, cb = a.step_calls(st_a, num_q_heads=HQ), b.step_calls(st_b, num_q_heads=HQ)
    for layer in range(LAYERS):
        k, v = (rng.standard_normal((2, HKV, D), np.float32) for _ in range(2))
        q = rng.standard_normal((2, HQ, D), np.float32)
        got = cb.write_attend(layer, k, v, q, copy=False)
        np.testing.assert_array_equal(got, ca.write_attend(layer, k, v, q))
    assert a.snapshot() == b.snapshot()

