"""kvcl's ONNX bridge: run an exported decoder with its KV cache in a :class:`kvcl.engine.PagedKVCache`.

* :func:`rewrite` replaces each layer's attention core with the ``kvcl::Attention`` op;
* :class:`Generator` loads an export (rewritten on load) and generates for a batch of prompts;
* :class:`ReferenceRunner` runs the original export with past_key_values fed back (the baseline);
* :func:`bench_step` / :func:`hook_overhead_us` time a decode step of the bridge against it.

Routes handled (fixtures in ``tests/fixtures/onnx/``): torch.onnx dynamo opset 18 (MatMul/Softmax)
and opset 23 (``Attention``), the legacy TorchScript exporter, optimum, and onnxruntime-genai's
builder (``GroupQueryAttention``).

Needs the ``onnx`` extra: ``pip install 'kvcl[onnx]'`` (onnx, onnxruntime, onnxruntime-extensions).
"""

from .customop import (HAVE_EXTENSIONS, OpError, kvcl_attention, register_cache, unregister_cache)
from .rewrite import RewriteError, is_rewritten, model_info, rewrite

__all__ = ["HAVE_EXTENSIONS", "OpError", "RewriteError", "rewrite", "is_rewritten", "model_info",
           "register_cache", "unregister_cache", "kvcl_attention", "Generator", "GenerationResult",
           "ReferenceRunner", "StepOutput", "bench_step", "hook_overhead_us"]


def __getattr__(name):  # lazy: generate.py pulls onnxruntime and the OpenCL device
    if name in ("Generator", "GenerationResult", "ReferenceRunner", "StepOutput"):
        from . import generate
        return getattr(generate, name)
    if name in ("bench_step", "hook_overhead_us"):
        from . import timing
        return getattr(timing, name)
    raise AttributeError(name)
