"""boa.decode: boa's own decode loop computes what the model's transformers forward does — each step's logits and
the greedy tokens — on float and packed models, with q/k/v and gate/up as one call each."""
import pytest
import torch
import transformers

import boa
from boa.decode import Decoder, concat_rows, supports
from boa.generate import generate
from conftest import build_gemma3, build_llama, random_windows

PROMPT = "w5 w17 w3 w99"


def build_qwen2():
    """A random Qwen2: q/k/v with biases."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    return model


FAMILIES = {"llama": build_llama, "qwen2": build_qwen2}


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_each_step_gives_the_models_own_logits(build):
    model = build()
    ids = random_windows(1, 20, seed=3)
    with torch.no_grad():
        expected = model(ids).logits[0]
    decoder = Decoder(model, max_len=20)
    torch.testing.assert_close(decoder.step(ids[:, :12]), expected[11], rtol=1e-4, atol=1e-4)  # the prompt at once
    for t in range(12, 20):  # then a token a step
        torch.testing.assert_close(decoder.step(ids[:, t:t + 1]), expected[t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_packed_models_decode_the_greedy_tokens_of_transformers(build, calib, word_tokenizer, tmp_path):
    result = boa.quantize(build(), boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    packed, _, _ = boa.load(boa.save(result, tmp_path / "q"))
    ours = generate(packed, word_tokenizer, PROMPT, max_new_tokens=16, stop_at_eos=False, engine="boa")
    theirs = generate(packed, word_tokenizer, PROMPT, max_new_tokens=16, stop_at_eos=False, engine="transformers")
    assert ours.tokens == theirs.tokens
    assert generate(packed, word_tokenizer, PROMPT, max_new_tokens=4, stop_at_eos=False).tokens == ours.tokens[:4]


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_the_cpp_layer_step_computes_the_torch_steps_logits(build, calib):
    """csrc/cpu/decode_layer.cpp against the torch path (its reference) on a packed model: every step's logits and
    the KV cache it fills."""
    result = boa.quantize(build(), boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    packed = boa.nn.pack_model(result.model, result.layers)
    ids = random_windows(1, 24, seed=4)
    native, reference = Decoder(packed, max_len=24), Decoder(packed, max_len=24, native=False)
    assert native.native is not None and reference.native is None
    torch.testing.assert_close(native.step(ids[:, :6]), reference.step(ids[:, :6]), rtol=0, atol=0)  # both torch
    for t in range(6, 24):
        torch.testing.assert_close(native.step(ids[:, t:t + 1]), reference.step(ids[:, t:t + 1]), rtol=1e-5,
                                   atol=1e-5)
    torch.testing.assert_close(native.keys, reference.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.values, reference.values, rtol=1e-5, atol=1e-5)
    assert Decoder(packed.to(torch.float16), max_len=8).native is None  # float16: the torch path only


@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_the_fixed_shape_step_computes_the_torch_steps_logits(build, calib):
    """The step a GPU captures as a CUDA graph (token and position as tensors, the cache written by index_copy_,
    attention over every position with the later ones masked), run op by op here, against the torch path: logits
    and cache, on a packed model after a prompt. Without a GPU no graph is captured."""
    result = boa.quantize(build(), boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    packed = boa.nn.pack_model(result.model, result.layers)
    ids = random_windows(1, 16, seed=5)
    fixed = Decoder(packed, max_len=20, native=False, cuda_graph=False)
    reference = Decoder(packed, max_len=20, native=False)
    fixed.use_graph = True  # the fixed-shape step without capture (a CPU decoder refuses cuda_graph=True)
    torch.testing.assert_close(fixed.step(ids[:, :5]), reference.step(ids[:, :5]), rtol=0, atol=0)  # the prompt
    for t in range(5, 16):
        torch.testing.assert_close(fixed.step(ids[:, t:t + 1]), reference.step(ids[:, t:t + 1]), rtol=1e-5,
                                   atol=1e-5)
    assert fixed.graph is None and fixed.length == reference.length == 16
    torch.testing.assert_close(fixed.keys, reference.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed.values, reference.values, rtol=1e-5, atol=1e-5)
    with pytest.raises(boa.BoaError, match="needs the model on a CUDA device"):
        Decoder(packed, max_len=4, cuda_graph=True)


def test_the_cpp_layer_step_on_a_bfloat16_model(calib):
    """A bfloat16 model: the C++ step's linears take bfloat16 x, its residual stream and attention stay float32; the
    torch path rounds after every op. Their logits agree to bfloat16's precision, step after step."""
    result = boa.quantize(build_llama(), boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    packed = boa.nn.pack_model(result.model, result.layers).to(torch.bfloat16)
    ids = random_windows(1, 24, seed=6)
    native, reference = Decoder(packed, max_len=24), Decoder(packed, max_len=24, native=False)
    assert native.native is not None and native.keys.dtype == torch.float32
    native.step(ids[:, :6]), reference.step(ids[:, :6])
    for t in range(6, 24):
        ours, theirs = native.step(ids[:, t:t + 1]).float(), reference.step(ids[:, t:t + 1]).float()
        assert (ours - theirs).abs().max() <= 0.03 * (theirs.max() - theirs.min())
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.999


def test_concatenated_rows_compute_the_layers_side_by_side(calib, tmp_path, word_tokenizer):
    result = boa.quantize(build_llama(), boa.GPTQ(bits=4, group_size=32), calib, progress=False)
    packed, _, _ = boa.load(boa.save(result, tmp_path / "q", word_tokenizer))
    attention = packed.model.layers[0].self_attn
    parts = [attention.q_proj, attention.k_proj, attention.v_proj]
    fused = concat_rows(parts)
    assert isinstance(fused, boa.nn.QuantLinear) and fused.out_features == 64 + 32 + 32
    for rows in (1, 5, 17):  # GEMV and the batched path
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], -1), rtol=1e-6, atol=1e-6)


def test_other_models_take_transformers_path(word_tokenizer):
    gemma = build_gemma3()
    assert supports(build_llama()) and not supports(gemma)
    with pytest.raises(boa.BoaError, match="decode loop runs llama, mistral, qwen2"):
        generate(gemma, word_tokenizer, PROMPT, max_new_tokens=2, engine="boa")
    assert len(generate(gemma, word_tokenizer, PROMPT, max_new_tokens=3, stop_at_eos=False).tokens) == 3
    with pytest.raises(boa.BoaError, match="engine='fast'"):
        generate(build_llama(), word_tokenizer, PROMPT, engine="fast")


def test_a_decoder_refuses_to_run_past_its_positions():
    decoder = Decoder(build_llama(), max_len=8)
    decoder.step(random_windows(1, 8))
    with pytest.raises(boa.BoaError, match="past the decoder's 8 positions"):
        decoder.step(random_windows(1, 1))


def test_a_packed_head_keeps_the_logits_close_and_is_refused_where_it_cannot_run(word_tokenizer):
    """head_bits=8: the head rounded per 32 weights and packed; every step's logits stay within 1% of their range of
    the float head's. Widths the kernels do not take, and transformers' path, are refused by name."""
    model = build_llama()
    ids = random_windows(1, 12, seed=7)
    packed, exact = Decoder(model, max_len=12, head_bits=8), Decoder(model, max_len=12)
    assert isinstance(packed.head, boa.nn.QuantLinear) and packed.head.packed.bits == 8
    for t in range(12):
        ours, theirs = packed.step(ids[:, t:t + 1]), exact.step(ids[:, t:t + 1])
        assert not torch.equal(ours, theirs)
        assert (ours - theirs).abs().max() <= 0.01 * (theirs.max() - theirs.min())
    with pytest.raises(boa.BoaError, match="head_bits=5"):
        Decoder(model, max_len=4, head_bits=5)
    with pytest.raises(boa.BoaError, match="leave head_bits out"):
        generate(model, word_tokenizer, PROMPT, max_new_tokens=2, engine="transformers", head_bits=8)
