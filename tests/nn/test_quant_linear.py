"""boa.nn: QuantLinear holds a layer packed (boa/core/packed.py) and computes with the packed kernels."""
import pytest
import torch

import boa
from boa.nn import QuantLinear, pack_model


def test_quant_linear_stays_packed_and_matches_the_fake_quantized_linear(tiny_llama, calib, heldout):
    """pack_model swaps nn.Linear for QuantLinear: its buffers are the packed bytes (bits/8 bytes a weight plus the
    grids), nothing unpacked appears after forwards or a cast to bfloat16, and logits match the fake-quant model."""
    result = boa.quantize(tiny_llama, boa.RTN(bits=4, group_size=32), None, progress=False)
    with torch.no_grad():
        expected = result.model(heldout).logits
    layers = dict(result.layers)
    model = pack_model(result.model, layers)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(modules) == set(layers)
    with torch.no_grad():
        torch.testing.assert_close(model(heldout).logits, expected, rtol=1e-4, atol=1e-4)
        model.to(torch.bfloat16)(heldout)
    for name, m in modules.items():
        q = layers[name]
        state = {k: v for k, v in m.state_dict().items() if k != "bias"}
        assert set(state) == {"qweight", "scales", "zeros"}
        assert m.qweight.numel() == q.codes.shape[0] * (-(-q.codes.shape[1] // 64) * 64) // 2
        assert m.scales.dtype == torch.float32  # survived .to(bfloat16)
        assert not hasattr(m, "weight")


def test_check_not_quantized(tiny_opt):
    """check_not_quantized: a float model passes; one holding QuantLinear layers (as boa.load returns) is refused,
    naming boa.load_model."""
    import boa
    from boa.nn import check_not_quantized

    check_not_quantized(tiny_opt)
    result = boa.quantize(tiny_opt, boa.RTN(bits=4), progress=False)
    packed = pack_model(tiny_opt, {"model.decoder.layers.0.fc1": result.layers["model.decoder.layers.0.fc1"]})
    with pytest.raises(boa.BoaError, match=r"already quantized .*\(boa.load_model\)"):
        check_not_quantized(packed)
