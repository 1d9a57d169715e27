"""KV-cache quantization: what the attention computes with equals an independent per-head reference applied to what
the model's own attention would have received."""
import pytest
import torch
from transformers import AttentionInterface

from conftest import build_llama, random_windows
from boa.core.errors import BoaError
from boa.models.attention_capture import eager_attention
from boa.models.adapter import adapter_for
from boa.transforms import KVQuant, Rotation, quantize_per_head, transform_from_dict

SPY = "boa_test_spy"
seen = {}


def spy(module, query, key, value, attention_mask, **kwargs):
    seen[module.layer_idx] = (query, key, value)
    return eager_attention(module)(module, query, key, value, attention_mask, **kwargs)


def reference(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """One head-vector at a time with Python floats: range clip·[min, max], 2^bits − 1 steps, rounded zero point."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        low, high = clip * float(row.min()), clip * float(row.max())
        step = (high - low) / (2**bits - 1)
        zero = round(-low / step)
        out[i] = torch.tensor([(min(max(round(float(v) / step) + zero, 0), 2**bits - 1) - zero) * step for v in row])
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits,clip", [(4, 0.95), (8, 1.0)])
def test_per_head_quantization_equals_the_reference(bits, clip):
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(bits)) + 0.3
    torch.testing.assert_close(quantize_per_head(x, bits, clip), reference(x, bits, clip), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotate_qk", [True, False])
def test_the_attention_attends_to_rotated_queries_and_quantized_keys_and_values(rotate_qk):
    AttentionInterface.register(SPY, spy)
    model = build_llama()
    model.config._attn_implementation = SPY
    ids = random_windows(2, 12)
    with torch.no_grad():
        model(ids)
    before = dict(seen)
    handles = KVQuant(bits=4, rotate_qk=rotate_qk).attach(model, adapter_for(model.config))
    assert model.config._attn_implementation == "boa_kv"
    with torch.no_grad():
        model(ids)
    d = model.config.hidden_size // model.config.num_attention_heads
    H = Rotation.build(d).matrix(torch.float32) if rotate_qk else torch.eye(d)
    q0, k0, v0 = before[0]  # block 0's inputs are the same in both runs
    q1, k1, v1 = seen[0]
    torch.testing.assert_close(q1, q0 @ H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, reference(k0 @ H, 4, 0.95), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v1, reference(v0, 4, 0.95), rtol=1e-4, atol=1e-4)
    for handle in handles:
        handle.remove()
    assert model.config._attn_implementation == SPY


def test_bad_settings_are_refused():
    for bad in ({"bits": 2}, {"clip_ratio": 0}, {"bits": True}):
        with pytest.raises(BoaError):
            transform_from_dict({"name": "kv_cache", **bad})


@pytest.mark.parametrize("stock", ["eager", "sdpa"])
def test_attention_stays_causal_and_masked_under_kv_quantization(stock):
    """transformers builds no mask for an attention implementation it has no mask builder for: kv_attention's
    stands in for the stock one's, so early positions never see later tokens (eager attention would otherwise run
    unmasked) and a chunk of several tokens against a cache is masked as in one pass."""
    from transformers import DynamicCache

    model = build_llama()
    model.config._attn_implementation = stock
    KVQuant(bits=8).attach(model, adapter_for(model.config))
    ids = random_windows(1, 12, seed=5)
    with torch.no_grad():
        whole = model(ids).logits
        torch.testing.assert_close(model(ids[:, :5]).logits, whole[:, :5], rtol=1e-5, atol=1e-5)
        cache = DynamicCache()
        model(ids[:, :8], cache=cache, use_cache=True)
        torch.testing.assert_close(model(ids[:, 8:], cache=cache, use_cache=True).logits, whole[:, 8:],
                                   rtol=1e-5, atol=1e-5)
