"""Per-token activation quantization against an independent row-by-row round-to-nearest, and its hooks on a model."""
import pytest
import torch

from conftest import build_llama, random_windows
from boa.core.errors import BoaError
from boa.models.adapter import adapter_for
from boa.transforms import ActivationQuant, quantize_per_token, transform_from_dict


def reference(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """One token at a time, with Python floats for the grid."""
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1])
    for i, row in enumerate(rows):
        step = clip * float(row.abs().max()) / (2 ** (bits - 1) - 1)
        codes = [min(max(round(float(v) / step), -(2 ** (bits - 1))), 2 ** (bits - 1) - 1) for v in row]
        out.reshape(-1, x.shape[-1])[i] = torch.tensor(codes, dtype=torch.float32) * step
    return out


@pytest.mark.parametrize("bits,clip", [(8, 1.0), (4, 0.9), (4, 0.5)])
def test_per_token_quantization_equals_the_reference(bits, clip):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 40, generator=gen) * torch.logspace(-2, 2, 40)
    got = quantize_per_token(x, bits, clip)
    torch.testing.assert_close(got, reference(x, bits, clip), rtol=1e-6, atol=1e-6)
    assert all(row.unique().numel() <= 2**bits for row in got.reshape(-1, 40))
    # the grid's positive edge is clip · max|x| (the negative one a step further: codes −2^(b−1) … 2^(b−1) − 1)
    assert (got.amax(-1) <= clip * x.abs().amax(-1) * (1 + 1e-6)).all()


def test_a_zero_token_stays_zero_and_dtypes_are_kept():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    x[1] = torch.arange(8)
    got = quantize_per_token(x, 4, 1.0)
    assert got.dtype == torch.bfloat16 and torch.equal(got[0], x[0])


def test_every_quantized_linear_reads_quantized_inputs_and_shared_inputs_stay_shared():
    model = build_llama()
    adapter = adapter_for(model.config)
    ActivationQuant(bits=4).apply(model, adapter)
    seen = {}
    block = adapter.blocks(model)[0]
    for name in adapter.linear_names():
        layer = block.get_submodule(name)
        layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
    with torch.no_grad():
        model(random_windows(2, 8))
    for name, x in seen.items():
        assert all(row.unique().numel() <= 16 for row in x.reshape(-1, x.shape[-1])), name
    assert seen["self_attn.q_proj"] is seen["self_attn.k_proj"] is seen["self_attn.v_proj"]
    x = seen["self_attn.q_proj"]  # it carries the input it was rounded from (TurboBoA's dX gap is measured from it)
    assert torch.equal(quantize_per_token(x.unquantized, 4, 0.9), x) and not torch.equal(x.unquantized, x)
    assert seen["mlp.gate_proj"] is seen["mlp.up_proj"]
    assert model.lm_head._forward_pre_hooks == {}  # the head stays float


def test_bad_settings_are_refused():
    for bad in ({"bits": 3}, {"bits": 16}, {"clip_ratio": 0}, {"clip_ratio": 1.5}):
        with pytest.raises(BoaError):
            transform_from_dict({"name": "activations", **bad})
