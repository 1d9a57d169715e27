"""Genie: distillation from BN statistics (Genie-D), the learned fake quantizers and block reconstruction
(Genie-M), save/load — each checked against an independent computation on a tiny BatchNorm CNN."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import boa
from boa.algorithms.genie import DistillConfig, ReconstructConfig, distill, reconstruct
from boa.algorithms.genie.distill import swing_convolution
from boa.core.errors import BoaError
from boa.models.vision import VisionSpec
from boa.nn.fake_quant import bit_plan
from boa.quant.learned import ActQuantizer, LearnedWeightQuantizer
from boa.core.quantizer import QuantSpec, find_grid


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))


def smooth_images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Spatially correlated images, each channel standardised (as normalised photographs roughly are)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 3, size + 4, size + 4, generator=g), 5, 1, 0)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True)
    return (x - mean) / var.sqrt()


@pytest.fixture(scope="module")
def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        Block(8, 16, 2),
        Block(16, 24, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)),
    )
    model.train()
    with torch.no_grad():  # BN running statistics of a data distribution, as after training
        for seed in range(30):
            model(smooth_images(64, seed=100 + seed))
    return model.eval()


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


def test_learned_weight_quantizer_gradient_matches_finite_differences():
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    q = LearnedWeightQuantizer(w, bits=3).double()
    with torch.no_grad():
        q.alpha.copy_(torch.empty_like(q.alpha).uniform_(-2, 2))  # inside the rectified sigmoid's open range
        q.scale.mul_(torch.empty_like(q.scale).uniform_(0.8, 1.2))
    c = torch.randn_like(w)

    def loss() -> torch.Tensor:
        return (q(w) * c).sum() + (q(w) ** 2).sum()

    loss().backward()
    eps = 1e-6
    for param in (q.scale, q.alpha):
        flat = param.data.view(-1)
        for i in torch.randperm(flat.numel())[:12].tolist():
            old = flat[i].item()
            flat[i] = old + eps
            up = loss().item()
            flat[i] = old - eps
            down = loss().item()
            flat[i] = old
            assert param.grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7)


def test_learned_weight_quantizer_starts_as_round_to_nearest():
    torch.manual_seed(2)
    w = torch.randn(5, 40)
    q = LearnedWeightQuantizer(w, bits=4)
    scale, zero = find_grid(w, QuantSpec(4, grid="mse"))
    inside = (w >= scale * (0 - zero)) & (w <= scale * (15 - zero))  # the clip search may cut the extremes
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(q(w)[inside], w[inside])  # soft rounding at its start reproduces W
    q.hard = True
    nearest = torch.clamp(torch.round(w / scale) + zero, 0, 15)
    assert torch.equal(q.codes(w), nearest)


def test_activation_quantizer_straight_through_gradient():
    act = ActQuantizer(4)
    x = torch.linspace(-3, 5, 101, dtype=torch.float32)
    act.initialise(torch.tensor([-1.0, 2.0]))  # negatives: signed
    assert bool(act.signed) and act.qrange == (-8, 7)
    step = act.step.detach().clone()
    x.requires_grad_(True)
    act(x).sum().backward()
    inside = (x / step >= -8.5) & (x / step <= 7.5)
    ratio = x.detach() / step
    expected_step_grad = torch.where(inside, torch.round(ratio) - ratio,
                                     torch.where(ratio < 0, torch.tensor(-8.0), torch.tensor(7.0))).sum()
    assert act.step.grad.item() == pytest.approx(expected_step_grad.item(), rel=1e-4)
    torch.testing.assert_close(x.grad, inside.float())


def test_bit_plan_keeps_first_and_last_layers_at_eight_bits():
    plan = bit_plan(5, w_bits=2, a_bits=4)
    assert [(b.weight, b.input) for b in plan] == [(8, None), (2, 8), (2, 4), (2, 4), (8, 8)]


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
        scale, zero = find_grid(w, QuantSpec(q.bits, grid="mse"))
        assert torch.equal(q.codes.float(), torch.clamp(torch.round(w / scale) + zero, 0, 2**q.bits - 1))


def test_saved_network_loads_with_identical_outputs(tmp_path):
    from boa.models.vision import build_vision_model

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


def test_bad_inputs_get_clear_errors(tiny_cnn, tmp_path):
    images = smooth_images(8)
    with pytest.raises(BoaError, match="w_bits=5: weights are saved packed"):
        reconstruct(tiny_cnn, images, ReconstructConfig(w_bits=5, iters=0), progress=False)
    with pytest.raises(BoaError, match="a_bits=9"):
        reconstruct(tiny_cnn, images, ReconstructConfig(a_bits=9, iters=0), progress=False)
    with pytest.raises(BoaError, match="nn.Sequential"):
        reconstruct(Block(3, 3, 1), images, ReconstructConfig(iters=0), progress=False)
    with pytest.raises(BoaError, match="multiple of 4"):
        distill(tiny_cnn, 3, 10, DistillConfig(n_images=2, batch_size=2, iters=1), progress=False)
    with pytest.raises(BoaError, match="BatchNorm2d"):
        distill(nn.Sequential(nn.Conv2d(3, 3, 1)), 3, 12, DistillConfig(n_images=2, batch_size=2, iters=1),
                progress=False)
    broken = nn.Sequential(nn.Conv2d(3, 3, 1))
    with torch.no_grad():
        broken[0].weight[0, 0] = math.nan
    with pytest.raises(BoaError, match=r"weight 0.weight holds NaN/Inf"):
        reconstruct(broken, images, ReconstructConfig(iters=0), progress=False)
    stale = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    stale[1].running_var[0] = math.inf
    with pytest.raises(BoaError, match=r"buffer 1.running_var holds NaN/Inf"):
        reconstruct(stale, images, ReconstructConfig(iters=0), progress=False)
    with pytest.raises(BoaError, match="data"):
        boa.VisionQuantConfig(data="imagenet").validate()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    spec = VisionSpec("tiny", 3, 12, (0.0,) * 3, (1.0,) * 3, 10, "none")
    config = boa.VisionQuantConfig(method="rtn", data="noise", n_images=8, a_bits=8)
    rtn = boa.quantize_vision(tiny_cnn, spec, config, images=images, progress=False)
    with pytest.raises(BoaError, match="not a boa-vision folder"):
        boa.save_vision(rtn, tmp_path / "taken")
    with pytest.raises(BoaError, match="not a quantized CNN"):
        boa.load_vision(tmp_path / "taken")


def test_cli_quantize_vision_saves_a_network_that_evaluates_the_same(tmp_path, capsys):
    """`boa quantize-vision` (zero-shot, tiny budgets) on EfficientNet-Lite0: a report with agreement and KL against
    the float model on the bundled photos, a saved folder that `boa eval-vision` scores identically."""
    pytest.importorskip("skimage")
    from boa.cli import main
    from boa.models.vision import _lite0_weights_file

    try:
        _lite0_weights_file()
    except BoaError as err:
        pytest.skip(str(err))
    out, report = tmp_path / "lite0-w4a8", tmp_path / "report.json"
    args = ["quantize-vision", "efficientnet-lite0", "--w-bits", "4", "--a-bits", "8", "--images", "4",
            "--distill-iters", "2", "--distill-batch", "4", "--iters", "2", "--batch-size", "2", "--eval-images", "6",
            "--out", str(out), "--json", str(report)]
    assert main(args) == 0
    import json

    rows = json.loads(report.read_text())["results"]
    assert [r["model"] for r in rows] == ["fp", "genie-m W4A8 (genie)"]
    assert rows[0]["agreement"] is None and 0 <= rows[1]["agreement"] <= 100 and rows[1]["kl"] >= 0
    again = tmp_path / "again.json"
    assert main(["eval-vision", str(out), "--eval-images", "6", "--json", str(again)]) == 0
    assert json.loads(again.read_text())["results"][1]["kl"] == rows[1]["kl"]

    assert main(["quantize-vision", "efficientnet-lite0", "--data", "real", "--images", "4"]) == 2
    assert "no real imagenet training images" in capsys.readouterr().err
    assert main(["quantize-vision", "efficientnet-lite0", "--w-bits", "5", "--images", "4"]) == 2
    assert "w_bits=5" in capsys.readouterr().err
    assert main(["quantize-vision", "efficientnet-lite0", "--resume"]) == 2
    assert "give the same --out" in capsys.readouterr().err
    assert not (tmp_path / "lite0-w4a8.partial").exists()  # the finished run removed its checkpoint


def test_interrupted_distillation_resumes_with_identical_images(tiny_cnn, tmp_path, monkeypatch):
    import importlib

    genie_d = importlib.import_module("boa.algorithms.genie.distill")  # the module (the package exports the function)

    config = DistillConfig(n_images=12, batch_size=4, iters=5)
    uninterrupted = distill(tiny_cnn, 3, 12, config, progress=False).images
    real_batch, calls = genie_d._distill_batch, []

    def stop_at_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")  # (pytest would take a KeyboardInterrupt for its own)
        return real_batch(*args)

    monkeypatch.setattr(genie_d, "_distill_batch", stop_at_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        distill(tiny_cnn, 3, 12, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["genie-d-0000.safetensors", "genie-d.json"]
    calls.clear()
    monkeypatch.setattr(genie_d, "_distill_batch", lambda *args: calls.append(1) or real_batch(*args))
    resumed = distill(tiny_cnn, 3, 12, config, progress=False, checkpoint_dir=tmp_path / "ckpt").images
    assert len(calls) == 2  # batches 1 and 2 only
    assert torch.equal(resumed, uninterrupted)
    with pytest.raises(BoaError, match="another model's or setting's distillation"):
        distill(tiny_cnn, 3, 12, DistillConfig(n_images=12, batch_size=4, iters=6), progress=False,
                checkpoint_dir=tmp_path / "ckpt")
