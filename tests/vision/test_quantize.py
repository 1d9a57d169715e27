"""The driver, boa.quantize_vision: its settings, the output folder it checks before any work, and the Genie-D
checkpoint beside that folder that a resumed run continues from."""
import pytest
import torch

import boa
import boa.vision.distillation as genie_d
from boa.core.errors import BoaError
from boa.vision import DistillConfig, VisionSpec, calibration_images

from .cnn import smooth_images

SPEC = VisionSpec("tiny", 3, 12, (0.0,) * 3, (1.0,) * 3, 10, "none")


def genie_config() -> boa.VisionQuantConfig:
    """RTN on 8 distilled images (two Genie-D batches of 4, 3 steps each): seconds on a CPU."""
    return boa.VisionQuantConfig(method="rtn", data="genie", n_images=8, a_bits=8,
                                 distill=DistillConfig(batch_size=4, iters=3))


def test_settings_are_checked():
    with pytest.raises(BoaError, match="data"):
        boa.VisionQuantConfig(data="imagenet").validate()
    with pytest.raises(BoaError, match="method"):
        boa.VisionQuantConfig(method="gptq").validate()
    with pytest.raises(BoaError, match="w_bits=5"):
        boa.VisionQuantConfig(w_bits=5).validate()
    config = boa.VisionQuantConfig(method="rtn", data="genie", n_images=8, seed=3)
    assert config.reconstruct_config().iters == 0 and config.reconstruct_config().seed == 3
    assert config.distill_config().n_images == 8 and config.distill_config().seed == 3
    assert config.to_dict()["distill"]["n_images"] == 8


def test_calibration_sources(tiny_cnn):
    config = boa.VisionQuantConfig(data="noise", n_images=5, seed=2)
    noise = calibration_images(tiny_cnn, SPEC, config, progress=False)
    assert noise.shape == (5, 3, 12, 12) and torch.equal(noise, calibration_images(tiny_cnn, SPEC, config))
    with pytest.raises(BoaError, match="no real none training images"):
        calibration_images(tiny_cnn, SPEC, boa.VisionQuantConfig(data="real", n_images=5))
    distilled = calibration_images(tiny_cnn, SPEC, genie_config(), progress=False)
    assert distilled.shape == (8, 3, 12, 12)


def test_output_folder_is_checked_before_any_work(tiny_cnn, tmp_path, monkeypatch):
    def no_work(*args):
        raise AssertionError("distilled before checking the output folder")

    monkeypatch.setattr(genie_d, "distill_batch", no_work)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(BoaError, match="not written by `boa quantize-vision`"):
        boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=tmp_path / "taken")
    assert not (tmp_path / "taken.partial").exists()
    with pytest.raises(BoaError, match="give the same --out"):
        boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, resume=True)
    with pytest.raises(BoaError, match="w_bits=5"):
        boa.quantize_vision(tiny_cnn, SPEC, boa.VisionQuantConfig(w_bits=5), progress=False)


def test_interrupted_run_resumes_from_its_checkpoint(tiny_cnn, tmp_path, monkeypatch):
    uninterrupted = boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False)
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    real_batch, calls = genie_d.distill_batch, []

    def stop_at_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_batch(*args)

    monkeypatch.setattr(genie_d, "distill_batch", stop_at_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=out)
    assert sorted(p.name for p in partial.iterdir()) == ["progress.json", "step-0000.safetensors"]
    assert not out.exists()

    calls.clear()
    monkeypatch.setattr(genie_d, "distill_batch", lambda *args: calls.append(1) or real_batch(*args))
    resumed = boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=out, resume=True)
    assert len(calls) == 1  # the second batch only
    x = smooth_images(6, seed=9)
    with torch.no_grad():
        assert torch.equal(resumed.model(x), uninterrupted.model(x))
    boa.save_vision(resumed, out)
    assert out.is_dir() and not partial.exists()

    # A folder of that name that boa did not write is refused and left alone.
    partial.mkdir()
    (partial / "stale").write_text("")
    with pytest.raises(boa.BoaError, match="not written by boa"):
        boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=out)
    assert (partial / "stale").exists()
    (partial / "stale").unlink()
    partial.rmdir()

    # An interrupted run's batches are not thrown away unasked: without resume or restart the run is refused;
    # restart discards them and starts over.
    calls.clear()
    monkeypatch.setattr(genie_d, "distill_batch", stop_at_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=out)
    with pytest.raises(boa.BoaError, match="1 finished steps.*--resume.*--restart"):
        boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=out)
    calls.clear()
    monkeypatch.setattr(genie_d, "distill_batch", lambda *args: calls.append(1) or real_batch(*args))
    boa.quantize_vision(tiny_cnn, SPEC, genie_config(), progress=False, out=out, restart=True)
    assert len(calls) == 2
