"""Genie-D: distillation from BN statistics, swing convolution and the checkpoint an interrupted run resumes from,
each checked against an independent computation on a tiny BatchNorm CNN."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import boa.vision.distillation as genie_d
from boa.core.errors import BoaError
from boa.vision import DistillConfig, distill
from boa.vision.distillation import swing_convolution

from .cnn import smooth_images


def brute_force_bn_loss(model: nn.Sequential, x: torch.Tensor) -> float:
    """Genie-D's loss written out: BN inputs captured, statistics from explicit sums."""
    inputs = []
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.append((m, a[0])))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for bn, t in inputs:
        flat = t.double().transpose(0, 1).reshape(t.shape[1], -1)
        n = flat.shape[1]
        mean = flat.sum(1) / n
        std = (((flat - mean[:, None]) ** 2).sum(1) / (n - 1)).sqrt()
        total += ((mean - bn.running_mean.double()) ** 2).sum().item() / len(mean)
        total += ((std - (bn.running_var.double() + 1e-6).sqrt()) ** 2).sum().item() / len(mean)
    per_image = x.double().reshape(*x.shape[:2], -1)
    mean = per_image.mean(-1)
    std = per_image.std(-1)
    total += ((mean**2).sum() + ((std - 1) ** 2).sum()).item() / len(x)
    return total


def test_distillation_lowers_bn_statistics_loss_tenfold(tiny_cnn):
    before = [p.clone() for p in tiny_cnn.state_dict().values()]
    result = distill(tiny_cnn, 3, 12, DistillConfig(n_images=24, batch_size=24, iters=400), progress=False)
    assert result.images.shape == (24, 3, 12, 12)
    start = result.first_loss[0]
    assert brute_force_bn_loss(tiny_cnn, result.images) < start / 10
    # Only the generator and latents learn: the network, its BN statistics and its mode are untouched.
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_cnn.state_dict().values()))
    assert not tiny_cnn.training and all(p.requires_grad for p in tiny_cnn.parameters())
    again = distill(tiny_cnn, 3, 12, DistillConfig(n_images=24, batch_size=24, iters=3), progress=False)
    repeat = distill(tiny_cnn, 3, 12, DistillConfig(n_images=24, batch_size=24, iters=3), progress=False)
    assert torch.equal(again.images, repeat.images)  # seeded


def test_swing_convolution_shifts_strided_convs_only_while_distilling(tiny_cnn):
    x = smooth_images(4, seed=7)
    strided = tiny_cnn[1].conv1
    plain_out = []
    hook = strided.register_forward_hook(lambda m, a, o: plain_out.append(o))
    with torch.no_grad():
        reference = tiny_cnn(x)
        shifts = torch.Generator().manual_seed(3)
        offsets = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(3)).tolist()
        with swing_convolution(tiny_cnn, shifts):
            tiny_cnn(x)
        after = tiny_cnn(x)
    hook.remove()
    plain, swung, plain_again = plain_out
    # Inside: the strided conv saw its input reflect-padded and cropped at the drawn offset.
    stem_out = tiny_cnn[0](x)
    dy, dx = offsets
    shifted = F.pad(stem_out, (1, 1, 1, 1), mode="reflect")[..., dy : dy + 12, dx : dx + 12]
    torch.testing.assert_close(swung, strided(shifted))
    if (dy, dx) != (1, 1):
        assert not torch.allclose(swung, plain)
    # Outside: no hook is left behind; the stride-1 convs never had one.
    assert torch.equal(plain_again, plain) and torch.equal(after, reference)
    assert all(not m._forward_pre_hooks for m in tiny_cnn.modules() if isinstance(m, nn.Conv2d))


def test_interrupted_distillation_resumes_with_identical_images(tiny_cnn, tmp_path, monkeypatch):
    config = DistillConfig(n_images=12, batch_size=4, iters=5)
    uninterrupted = distill(tiny_cnn, 3, 12, config, progress=False)
    real_batch, calls = genie_d.distill_batch, []

    def stop_at_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")  # (pytest would take a KeyboardInterrupt for its own)
        return real_batch(*args)

    monkeypatch.setattr(genie_d, "distill_batch", stop_at_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        distill(tiny_cnn, 3, 12, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    # One checkpoint step per finished batch (boa.core.checkpoint).
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["progress.json", "step-0000.safetensors"]
    calls.clear()
    monkeypatch.setattr(genie_d, "distill_batch", lambda *args: calls.append(1) or real_batch(*args))
    resumed = distill(tiny_cnn, 3, 12, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert len(calls) == 2  # batches 1 and 2 only
    assert torch.equal(resumed.images, uninterrupted.images)
    assert resumed.first_loss == uninterrupted.first_loss and resumed.last_loss == uninterrupted.last_loss
    # Another setting (or model) finds the folder taken.
    with pytest.raises(BoaError, match="belongs to a different run"):
        distill(tiny_cnn, 3, 12, DistillConfig(n_images=12, batch_size=4, iters=6), progress=False,
                checkpoint_dir=tmp_path / "ckpt")
    other = copy.deepcopy(tiny_cnn)  # the same settings, one BN statistic changed
    with torch.no_grad():
        other[0][1].running_mean[0] += 1
    with pytest.raises(BoaError, match="belongs to a different run"):
        distill(other, 3, 12, config, progress=False, checkpoint_dir=tmp_path / "ckpt")


def test_bad_inputs_get_clear_errors(tiny_cnn):
    with pytest.raises(BoaError, match="multiple of 4"):
        distill(tiny_cnn, 3, 10, DistillConfig(n_images=2, batch_size=2, iters=1), progress=False)
    with pytest.raises(BoaError, match="BatchNorm2d"):
        distill(nn.Sequential(nn.Conv2d(3, 3, 1)), 3, 12, DistillConfig(n_images=2, batch_size=2, iters=1),
                progress=False)
    with pytest.raises(BoaError, match="batch_size ≥ 2"):
        distill(tiny_cnn, 3, 12, DistillConfig(n_images=2, batch_size=1, iters=1), progress=False)
