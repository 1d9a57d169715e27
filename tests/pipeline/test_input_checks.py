"""What boa.quantize checks before any work: finite weights, calibration windows of the right type and vocabulary,
a kernel backend that exists. Each failure is a boa.BoaError (or BackendError) whose message names the problem; the
model is left as it was and no checkpoint is written."""
import copy
import math

import pytest
import torch

import boa
from boa.algorithms import method_from_dict

from conftest import build_llama


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_non_finite_weight(tiny_llama, calib, tmp_path, bad, method):
    """A NaN/Inf weight is caught before anything runs: the message names the weight, the model is unchanged and
    no checkpoint is written."""
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        tiny_llama.get_parameter(name)[3, 5] = bad
    before = copy.deepcopy(tiny_llama.state_dict())
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(boa.BoaError, match=rf"weight {name} holds NaN/Inf"):
        boa.quantize(tiny_llama, method_from_dict({"method": method}), calib, checkpoint_dir=checkpoint,
                     progress=False)
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()) and value.isnan().equal(before[key].isnan())
    assert not checkpoint.exists()


def test_bad_calibration_tensor(tiny_llama, calib):
    """GPTQ without windows, or with float/1-D windows, is refused and leaves the model as it was."""
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(boa.BoaError, match="needs calibration windows"):
        boa.quantize(tiny_llama, boa.GPTQ(), None, progress=False)
    for windows in (calib.float(), calib[0]):
        with pytest.raises(boa.BoaError, match=r"calib must be a LongTensor \(nsamples, seqlen\)"):
            boa.quantize(tiny_llama, boa.GPTQ(), windows, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


def test_calibration_ids_outside_the_vocabulary(tiny_llama):
    with pytest.raises(boa.BoaError, match="vocab"):
        boa.quantize(tiny_llama, boa.GPTQ(), torch.full((2, 8), 300), progress=False)


def test_quantize_rejects_a_bad_backend_before_any_work(monkeypatch):
    from boa_kernels.dispatch import BackendError

    model = build_llama(num_layers=1)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    monkeypatch.setenv("BOA_KERNELS", "fortran")
    with pytest.raises(BackendError, match="BOA_KERNELS='fortran'"):
        boa.quantize(model, boa.RTN(bits=4), None, progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_an_already_quantized_model_is_refused(tiny_llama, calib, tmp_path):
    result = boa.quantize(tiny_llama, boa.RTN(bits=4, group_size=32), progress=False)
    boa.save(result, tmp_path / "q")
    loaded, _, _ = boa.load(tmp_path / "q")
    with pytest.raises(boa.BoaError, match=r"already quantized .*\(boa.load_model\)"):
        boa.quantize(loaded, boa.GPTQ(bits=4), calib, progress=False)


def test_empty_calibration_windows_are_refused(tiny_llama):
    with pytest.raises(boa.BoaError, match=r"calib holds no tokens \(shape \(0, 32\)\)"):
        boa.quantize(tiny_llama, boa.GPTQ(bits=4), torch.zeros(0, 32, dtype=torch.long), progress=False)
