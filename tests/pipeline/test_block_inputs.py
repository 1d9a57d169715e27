"""boa.pipeline.BlockInputs: what enters the first block, per batch of calibration windows (the model's own
embeddings and the keyword arguments it passes its blocks), the FP path's copy for the dX correction, and the
checkpoint round trip of the activations."""
import torch

from boa.models import adapter_for
from boa.pipeline import BlockInputs
from boa.pipeline.inputs import FORWARD_BATCH

from conftest import build_llama, random_windows


def capture(with_fp, dtype=torch.float32, n=FORWARD_BATCH + 3):
    model = build_llama()
    calib = random_windows(n, 16, seed=4)
    return model, calib, BlockInputs.capture(model, adapter_for(model.config).blocks(model), calib, dtype, with_fp)


def test_capture_keeps_what_enters_the_first_block_per_batch():
    model, calib, inputs = capture(with_fp=False)
    assert [x.shape[0] for x in inputs.hidden] == [FORWARD_BATCH, 3]
    with torch.no_grad():
        embeddings = model.model.embed_tokens(calib)
    torch.testing.assert_close(torch.cat(list(inputs.hidden)), embeddings, rtol=0, atol=0)
    assert inputs.fp is None and len(inputs.kwargs) == 2
    for kw in inputs.kwargs:
        assert kw["use_cache"] is False
        assert not {"hidden_states", "past_key_values", "past_key_value"} & set(kw)
        assert "position_embeddings" in kw  # what the model computed for its blocks (RoPE)
    # the blocks run on them: block 0's outputs on the captured inputs are the model's own hidden states
    block = adapter_for(model.config).blocks(model)[0]

    def output(x, kw):
        out = block(x, **kw)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        expected = model(input_ids=calib, output_hidden_states=True).hidden_states[1]
        got = torch.cat([output(x, kw) for x, kw in zip(inputs.hidden, inputs.kwargs)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_fp_path_starts_as_a_copy_in_the_cache_dtype():
    _, _, inputs = capture(with_fp=True, dtype=torch.float16)
    assert all(x.dtype == torch.float16 for x in [*inputs.hidden, *inputs.fp])
    for x, fp in zip(inputs.hidden, inputs.fp):
        assert torch.equal(x, fp) and x.data_ptr() != fp.data_ptr()


def test_state_and_restore_round_trip():
    _, _, inputs = capture(with_fp=True)
    _, _, fresh = capture(with_fp=True)
    changed = {k: v + 1 for k, v in inputs.state().items()}
    assert set(changed) == {"batch_0", "batch_1", "fp_batch_0", "fp_batch_1"}
    fresh.restore(changed, 1)
    assert fresh.block == 1 and fresh.kwargs is fresh.per_block[1]
    assert all(torch.equal(a, b + 1) for a, b in zip(fresh.hidden, inputs.hidden))
    assert all(torch.equal(a, b + 1) for a, b in zip(fresh.fp, inputs.fp))


def test_each_block_gets_the_keyword_arguments_the_model_passes_it():
    """Gemma 3 passes sliding-window layers and global ones their own mask and RoPE: each block's are recorded (no
    block computed), and `kwargs` follows the block the activations enter."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, vocab_size=256, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = Gemma3ForCausalLM(config).eval()
    model.config._attn_implementation = "eager"  # masks as tensors (sdpa's full causal one is None)
    blocks = adapter_for(model.config).blocks(model)
    calls = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    inputs = BlockInputs.capture(model, blocks, random_windows(3, 12), torch.float32, with_fp=False)
    assert calls == list(blocks) and len(inputs.per_block) == 3  # pre-hooks ran, forwards did not (one batch)
    sliding, full, sliding_again = (kw[0] for kw in inputs.per_block)
    assert sliding["attention_mask"] is sliding_again["attention_mask"]
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # local vs global RoPE
    # run block by block on what was recorded, the blocks give the model's own hidden states
    with torch.no_grad():
        expected = model(input_ids=random_windows(3, 12), output_hidden_states=True).hidden_states
        for i, block in enumerate(blocks):
            assert inputs.block == i and inputs.kwargs is inputs.per_block[i]
            inputs.advance(block, None)
            got = inputs.hidden.stored(0)
            got = model.model.norm(got) if i == len(blocks) - 1 else got  # the last hidden state is normed
            torch.testing.assert_close(got, expected[i + 1], rtol=1e-5, atol=1e-5)
