"""boa.generate: the KV-cache loop gives exactly transformers' own greedy continuation, on the float model and on a
saved, packed one; sampling is seeded and streams the text. `boa generate`: tests/cli/test_cli_generate.py."""
import pytest

import boa
from boa.generate import generate

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


def test_packed_model_generates_like_its_fake_quantized_twin(tiny_llama, calib, word_tokenizer, tmp_path):
    """Saved and loaded (packed QuantLinear on the C++ kernels), the model continues the prompt as the in-memory
    fake-quantized model does under transformers' generate."""
    result = boa.quantize(tiny_llama, boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    expected = hf_greedy(result.model, word_tokenizer, 10)
    packed, tokenizer, _ = boa.load(boa.save(result, tmp_path / "q", word_tokenizer))
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
