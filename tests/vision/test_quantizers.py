"""The learned fake quantizers of Genie-M (weights: learned step + AdaRound; activations: LSQ) and the bit plan that
places them, each checked against an independent computation."""
import pytest
import torch

from boa.core.quantizer import QuantSpec, find_grid
from boa.vision.fake_quant import bit_plan
from boa.vision.quantizers import ActQuantizer, LearnedWeightQuantizer


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
    scale, zero, _ = find_grid(w, QuantSpec(4, grid="mse"))
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
