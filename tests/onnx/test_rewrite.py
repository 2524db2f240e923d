"""The rewrite: every fixture route is handled; unhandled models fail with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from bridge_fixtures import MANIFEST, ROUTES, fixture_path, require_onnx

require_onnx()

import synthetic  # noqa: E402


@pytest.mark.parametrize("route", ROUTES)
def test_rewrite_fixture(route):
    import onnx

    from kvcl.onnx import is_rewritten, model_info, rewrite
    m = rewrite(fixture_path(route))
    if "genai" not in route:  # genai puts contrib ops in the default domain: the checker refuses them
        onnx.checker.check_model(m)
    assert is_rewritten(m)
    info = model_info(m)
    spec = MANIFEST[route]
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == \
        (spec["num_layers"], spec["num_kv_heads"], spec["head_dim"])
    # every scalar on the q, k and score paths folded into 1/sqrt(head_dim)
    assert [float(s) for s in info["scales"].split(",")] == pytest.approx([spec["head_dim"] ** -0.5] * spec["num_layers"])
    original = onnx.load(str(fixture_path(route)))
    expected_in = [i.name for i in original.graph.input if not i.name.startswith("past_key_values.")]
    assert [i.name for i in m.graph.input] == expected_in + ["kvcl_step"]
    assert [o.name for o in m.graph.output] == ["logits"]
    ops = [n for n in m.graph.node if n.domain == "kvcl"]
    op_type = "AttentionQKVRope" if "genai" in route else "Attention"
    assert [n.op_type for n in ops] == [op_type] * spec["num_layers"]
    if "genai" in route:   # the RoPE tables are named, not inputs: onnxruntime would copy them per call
        assert all(list(n.input) == [n.input[0], "kvcl_step"] for n in ops)
        inits = {t.name for t in m.graph.initializer}
        assert all({a.s.decode() for a in n.attribute if a.name.endswith("_table")} <= inits for n in ops)
    # nothing of the original attention core survives
    assert not any(n.op_type in ("Softmax", "GroupQueryAttention") for n in m.graph.node)
    assert not any(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in m.graph.node)


def test_rewrite_refuses_twice():
    from kvcl.onnx import RewriteError, rewrite
    m = rewrite(fixture_path(ROUTES[0]))
    with pytest.raises(RewriteError, match="already rewritten"):
        rewrite(m)


@pytest.mark.parametrize("variant, message", [
    ("no_past", r"no past_key_values\.N\.key/value inputs"),
    ("no_concat", r"pattern Concat\(past_key_values\.0\.key, new\) -> present\.0\.key not found.*Add"),
    ("softcap", r"soft-capping"),
    ("matrix_mul", r"unexpected MatMul .* on the score path"),
])
def test_unhandled_models_raise_clear_errors(variant, message):
    from kvcl.onnx import RewriteError, rewrite
    with pytest.raises(RewriteError, match=message):
        rewrite(synthetic.build(variant))


def test_rewrite_error_is_a_value_error():
    from kvcl import KvclError
    from kvcl.onnx import RewriteError
    assert issubclass(RewriteError, ValueError) and issubclass(RewriteError, KvclError)


def test_rewrite_accepts_path_and_proto(tmp_path):
    import onnx

    from kvcl.onnx import rewrite
    p = fixture_path("llama_torchscript")
    a = rewrite(p)
    b = rewrite(onnx.load(str(p)))
    c = rewrite(str(p), kv_dtype="int8")
    assert len(a.graph.node) == len(b.graph.node)
    assert {x.key: x.value for x in c.metadata_props}["kvcl.kv_dtype"] == "int8"
    with pytest.raises(TypeError, match="model_or_path"):
        rewrite(42)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_synthetic_decoder(dtype, onnx_device):
    """A hand-built decoder; in float16 the op is wrapped in Casts (float16 would abort the process)."""
    from kvcl.onnx import Generator, ReferenceRunner, rewrite
    m = synthetic.build("plain", dtype)
    rw = rewrite(m)
    casts = [n for n in rw.graph.node if n.op_type == "Cast" and n.name.startswith("kvcl_cast")]
    assert len(casts) == (4 if dtype == "fp16" else 0)
    ref = ReferenceRunner(m).generate([5], 8)
    gen = Generator(m, device=onnx_device, max_tokens=64)
    try:
        got = gen.generate([[5]], 8, return_logits=True)
    finally:
        gen.close()
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    rel = float(np.abs(got.logits - ref.logits).max() / np.abs(ref.logits).max())
    assert rel < (1e-5 if dtype == "fp32" else 2e-3)
