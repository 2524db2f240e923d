"""A real-weights model through the bridge: SmolLM2-135M-Instruct (30 layers, GQA 9/3 x 64).

Random-weight fixtures prove shapes; this proves behaviour: greedy tokens of real English
through the bridge (fp32 KV) equal the original export's in onnxruntime, logits within 1e-4
of the largest logit. The model is exported by ``tools/export_real_model.sh`` into a cache
folder (``kvcl.onnx.models``; CI runs the tool first). Without it the tests are skipped, saying
so; ``KVCL_REQUIRE_REAL_MODEL=1`` (set by CI) makes a missing model a failure instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from bridge_fixtures import require_onnx

require_onnx()

PROMPT = "The capital of France is Paris. The capital of Germany is"
STEPS = 16


@pytest.fixture(scope="module")
def prompt_ids(real_model):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(real_model.parent / "tokenizer.json"))
    return tok.encode(PROMPT).ids, tok


def test_greedy_tokens_and_logits_equal_onnxruntime(real_model, prompt_ids, onnx_device):
    from kvcl.onnx import Generator, ReferenceRunner
    ids, tok = prompt_ids
    ref = ReferenceRunner(real_model).generate(ids, STEPS)
    gen = Generator(real_model, kv_dtype="fp32", device=onnx_device, max_tokens=256)
    try:
        got = gen.generate([ids], STEPS, return_logits=True)
    finally:
        gen.close()
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    scale = np.abs(ref.logits).max(axis=-1, keepdims=True)
    rel = float((np.abs(got.logits - ref.logits) / scale).max())
    assert rel <= 1e-4, rel
    text = tok.decode(ref.tokens[0].tolist())
    assert "Berlin" in text, text          # a real model: it knows the answer
    print(f"max relative logit difference {rel:.2e}; continuation: {text!r}")


def test_batch_of_real_prompts_equals_each_alone(real_model, prompt_ids, onnx_device):
    # ragged prompts of real text in one batch: each row's greedy tokens as when run alone
    from kvcl.onnx import Generator
    ids, tok = prompt_ids
    other = tok.encode("Water boils at a temperature of").ids
    gen = Generator(real_model, kv_dtype="fp32", device=onnx_device, max_tokens=256)
    try:
        both = gen.generate([ids, other], 6).tokens
        alone = [gen.generate([p], 6).tokens[0] for p in (ids, other)]
    finally:
        gen.close()
    np.testing.assert_array_equal(both, np.stack(alone))
