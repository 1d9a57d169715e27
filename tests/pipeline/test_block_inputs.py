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
    block = adapter_for(model.config).blocks(model)[0]
    return model, calib, BlockInputs.capture(model, block, calib, dtype, with_fp)


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
    fresh.restore(changed)
    assert all(torch.equal(a, b + 1) for a, b in zip(fresh.hidden, inputs.hidden))
    assert all(torch.equal(a, b + 1) for a, b in zip(fresh.fp, inputs.fp))
