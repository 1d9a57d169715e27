"""The saved CNN format: a folder that loads back into a network computing exactly what the quantized one did, and
the output-folder rules it shares with boa's other formats (boa.core.output)."""
import json

import pytest
import torch

import boa
from boa.core.errors import BoaError
from boa.vision import VisionSpec, build_vision_model

from .cnn import smooth_images


def test_saved_network_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model, spec = build_vision_model("fmnist-resnet")
    images = torch.randn(48, 1, 28, 28)
    config = boa.VisionQuantConfig(w_bits=3, a_bits=4, data="noise", n_images=48)
    config.reconstruct.iters = 4
    config.reconstruct.batch_size = 8
    result = boa.quantize_vision(model, spec, config, images=images, progress=False)
    boa.save_vision(result, tmp_path / "q")
    loaded, loaded_spec, manifest = boa.load_vision(tmp_path / "q")
    assert loaded_spec == spec and manifest["config"]["w_bits"] == 3
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.5 * sum(
        p.numel() * 4 for p in model.parameters())

    # A layer whose recorded width disagrees with its packed codes is refused, naming it.
    path = tmp_path / "q" / "quantization.json"
    edited = json.loads(path.read_text())
    name = next(n for n, info in edited["layers"].items() if info["weight_bits"] == 3)
    edited["layers"][name]["weight_bits"] = 4
    path.write_text(json.dumps(edited))
    with pytest.raises(BoaError, match=f"layer {name}: qweight is .* but 4-bit codes"):
        boa.load_vision(tmp_path / "q")


def test_output_folders(tiny_cnn, tmp_path):
    spec = VisionSpec("tiny", 3, 12, (0.0,) * 3, (1.0,) * 3, 10, "none")
    config = boa.VisionQuantConfig(method="rtn", data="noise", n_images=8, a_bits=8)
    rtn = boa.quantize_vision(tiny_cnn, spec, config, images=smooth_images(8), progress=False)
    # Someone else's folder is neither written nor read.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(BoaError, match="not empty and was not written by `boa quantize-vision`"):
        boa.save_vision(rtn, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    with pytest.raises(BoaError, match="not a quantized CNN"):
        boa.load_vision(tmp_path / "taken")
    (tmp_path / "file").write_text("")
    with pytest.raises(BoaError, match="is a file"):
        boa.save_vision(rtn, tmp_path / "file")
    # An earlier output is replaced whole, and the run's checkpoint beside it goes.
    out = tmp_path / "q"
    boa.save_vision(rtn, out, report={"note": 1})
    (tmp_path / "q.partial").mkdir()
    boa.save_vision(rtn, out)
    assert json.loads((out / "quantization.json").read_text())["report"] is None
    assert not (tmp_path / "q.partial").exists()
