"""boa.generate: the KV-cache loop gives exactly transformers' own greedy continuation, on the float model and on a
saved, packed one; sampling is seeded and streams the text. `boa generate`: tests/cli/test_cli_generate.py."""
import pytest
import torch

import boa
from boa.generate import generate
from boa.nn.quant_linear import QuantLinear
from conftest import build_gemma3, build_llama, build_mixtral, build_phi3, build_qwen3_moe

PROMPT = "w5 w17 w3 w99"


def hf_greedy(model, tokenizer, n: int) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_generate(tiny_llama, word_tokenizer):
    result = generate(tiny_llama, word_tokenizer, PROMPT, max_new_tokens=12, stop_at_eos=False)
    assert result.tokens == hf_greedy(tiny_llama, word_tokenizer, 12)
    assert result.prompt_tokens == 4 and result.tok_s > 0
    assert result.text == word_tokenizer.decode(result.tokens, skip_special_tokens=True)


FAMILIES = {"llama": build_llama, "gemma3": build_gemma3, "phi3": build_phi3, "mixtral": build_mixtral,
            "qwen3_moe": build_qwen3_moe}


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_packed_model_generates_like_its_fake_quantized_twin(build, calib, word_tokenizer, tmp_path):
    """Saved and loaded (packed QuantLinear on the C++ kernels; Phi-3's fused projections one packed matrix each,
    MoE experts one packed layer each), the model continues the prompt as the in-memory fake-quantized model does
    under transformers' generate."""
    result = boa.quantize(build(), boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    expected = hf_greedy(result.model, word_tokenizer, 10)
    packed, tokenizer, _ = boa.load(boa.save(result, tmp_path / "q", word_tokenizer))
    assert sum(isinstance(m, QuantLinear) for m in packed.modules()) == len(result.layers)
    assert generate(packed, tokenizer, PROMPT, max_new_tokens=10, stop_at_eos=False).tokens == expected


def test_sampling_is_seeded_and_streams_the_text(tiny_llama, word_tokenizer):
    pieces = []
    a = generate(tiny_llama, word_tokenizer, PROMPT, 16, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False,
                 stream=pieces.append)
    b = generate(tiny_llama, word_tokenizer, PROMPT, 16, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    c = generate(tiny_llama, word_tokenizer, PROMPT, 16, temperature=1.0, top_p=0.9, seed=4, stop_at_eos=False)
    assert a.tokens == b.tokens != c.tokens
    assert "".join(pieces) == a.text


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be at least 1"),
    ({"temperature": -0.5}, "temperature=-0.5 must be a number >= 0"),
    ({"temperature": 1.0, "top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"temperature": 1.0, "top_p": 1.2}, r"top_p=1.2 must be in \(0, 1\]"),
    ({"prompt": ""}, "has no tokens"),
], ids=["max-new-tokens-0", "temperature-negative", "top-p-0", "top-p-above-1", "empty-prompt"])
def test_generate_refuses_settings_that_cannot_generate(tiny_llama, word_tokenizer, kwargs, message):
    args = {"prompt": PROMPT, **kwargs}
    with pytest.raises(boa.BoaError, match=message):
        generate(tiny_llama, word_tokenizer, **args)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kv_cache_is_stored_at_its_bits_and_attends_like_the_fake_quantized_cache(tiny_llama, calib,
                                                                                              word_tokenizer, bits):
    """With a KV-cache transform, generate keeps codes (two per byte at 4 bits) and a float32 scale and zero point per
    head and token; what attention sees is what the fake quantization of a float cache gives (rounding of the
    rotation on 1 vs all positions aside), so the greedy tokens are the same."""
    from boa.transforms import KVQuant, QuaRot, kv_cache

    config = boa.QuantConfig(boa.RTN(bits=8), transforms=(QuaRot(), KVQuant(bits)))
    model = boa.quantize(tiny_llama, config, calib, progress=False).model
    stored = generate(model, word_tokenizer, PROMPT, max_new_tokens=12, stop_at_eos=False)
    transforms, model.boa_transforms = model.boa_transforms, ()  # generate then keeps a float DynamicCache
    fake = generate(model, word_tokenizer, PROMPT, max_new_tokens=12, stop_at_eos=False, engine="transformers")
    model.boa_transforms = transforms
    assert stored.tokens == fake.tokens
    # the logits of a step against the stored cache = one pass over every position with the fake-quantized cache
    ids = torch.tensor([word_tokenizer(PROMPT).input_ids + stored.tokens])
    cache = transforms[-1].new_cache()
    with torch.no_grad():
        model(ids[:, :-3], cache=cache, use_cache=True)
        step = model(ids[:, -3:], cache=cache, use_cache=True).logits
        whole = model(ids).logits[:, -3:]
        attached = dict(kv_cache._settings)
        kv_cache._settings.clear()  # kv_attention passes float keys and values through
        float_kv = model(ids).logits[:, -3:]
        kv_cache._settings.update(attached)
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
    assert (step - float_kv).abs().max() > 100 * (step - whole).abs().max()  # the KV rounding is seen
    c = model.config
    tokens = stored.prompt_tokens + len(stored.tokens) - 1  # the last token is never fed back
    d = c.hidden_size // c.num_attention_heads
    vectors = 2 * c.num_hidden_layers * c.num_key_value_heads * tokens
    assert stored.cache_bytes == vectors * (d * bits // 8 + 8)
    assert fake.cache_bytes == vectors * d * 4  # float32
