"""Genie-M: block reconstruction beats round-to-nearest, its RTN is round-to-nearest on the 2.4-norm grid, and bad
inputs get clear errors — on a tiny BatchNorm CNN."""
import math

import pytest
import torch
from torch import nn

from boa.core.errors import BoaError
from boa.core.quantizer import QuantSpec, find_grid
from boa.vision import ReconstructConfig, reconstruct

from .cnn import Block, smooth_images


def test_reconstruction_beats_rtn(tiny_cnn):
    calib, heldout = smooth_images(256, seed=1), smooth_images(128, seed=2)
    rtn = reconstruct(tiny_cnn, calib, ReconstructConfig(w_bits=2, a_bits=4, iters=0), progress=False)
    genie = reconstruct(tiny_cnn, calib, ReconstructConfig(w_bits=2, a_bits=4, iters=300), progress=False)
    for unit in genie.unit_loss:
        assert unit["learned"] < unit["rtn"]
    with torch.no_grad():
        target = tiny_cnn(heldout)
        err_rtn = (rtn.model(heldout) - target).pow(2).sum(1).mean().item()
        err_genie = (genie.model(heldout) - target).pow(2).sum(1).mean().item()
    assert err_genie < 0.8 * err_rtn
    # The float model is untouched, and the quantized weights sit on their grids.
    assert all(not hasattr(m, "input_quantizer") for m in tiny_cnn.modules())
    for name, layer in genie.layers.items():
        weight = dict(genie.model.named_modules())[name].weight
        q = layer.weight
        torch.testing.assert_close(weight.reshape(len(q.codes), -1), q.scale * (q.codes.float() - q.zero),
                                   rtol=0, atol=0)
        assert int(q.codes.max()) < 2**q.bits


def test_rtn_weights_are_round_to_nearest(tiny_cnn):
    result = reconstruct(tiny_cnn, smooth_images(32), ReconstructConfig(w_bits=4, a_bits=8, iters=0), progress=False)
    float_layers = dict(tiny_cnn.named_modules())
    for name, layer in result.layers.items():
        q = layer.weight
        w = float_layers[name].weight.detach().reshape(len(q.codes), -1)
        scale, zero, _ = find_grid(w, QuantSpec(q.bits, grid="mse"))
        assert torch.equal(q.codes.float(), torch.clamp(torch.round(w / scale) + zero, 0, 2**q.bits - 1))


def test_bad_inputs_get_clear_errors(tiny_cnn):
    images = smooth_images(8)
    with pytest.raises(BoaError, match="w_bits=5: weights are saved packed"):
        reconstruct(tiny_cnn, images, ReconstructConfig(w_bits=5, iters=0), progress=False)
    with pytest.raises(BoaError, match="a_bits=9"):
        reconstruct(tiny_cnn, images, ReconstructConfig(a_bits=9, iters=0), progress=False)
    with pytest.raises(BoaError, match="nn.Sequential"):
        reconstruct(Block(3, 3, 1), images, ReconstructConfig(iters=0), progress=False)
    broken = nn.Sequential(nn.Conv2d(3, 3, 1))
    with torch.no_grad():
        broken[0].weight[0, 0] = math.nan
    with pytest.raises(BoaError, match=r"weight 0.weight holds NaN/Inf"):
        reconstruct(broken, images, ReconstructConfig(iters=0), progress=False)
    stale = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    stale[1].running_var[0] = math.inf
    with pytest.raises(BoaError, match=r"buffer 1.running_var holds NaN/Inf"):
        reconstruct(stale, images, ReconstructConfig(iters=0), progress=False)
