"""AdaRound's pieces shared by aespa and Genie-M (boa.core.adaround): the β schedule of the rounding regulariser and
the inverse of the rectified sigmoid."""
import torch

from boa.core.adaround import beta_at, rectified_sigmoid, rectified_sigmoid_inverse


def test_beta_schedule():
    assert beta_at(0, 100) is None and beta_at(19, 100) is None
    assert beta_at(20, 100) == 20.0 and beta_at(100, 100) == 2.0
    assert 2.0 < beta_at(60, 100) < 20.0


def test_rectified_sigmoid_inverse_inverts_it():
    h = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(rectified_sigmoid_inverse(h)), h)
