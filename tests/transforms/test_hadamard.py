"""Hadamard constructions and the fast transform, against explicit matrices."""
import pytest
import torch

from boa.transforms.hadamard import Rotation, fast_walsh_hadamard, hadamard, hadamard_core, sylvester

# Paley I (p ≡ 3 mod 4: 12, 20, 44, 60…), Paley II (p ≡ 1 mod 4: 12, 28, 36, 60…), Sylvester, and the
# orders of SmolLM2 (576, 1536), Gemma-3-270M (640) and head dims
ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 44, 60, 64, 108, 576, 640, 1536]


@pytest.mark.parametrize("n", ORDERS)
def test_each_constructed_matrix_is_hadamard(n):
    H = hadamard(n)
    assert H is not None and H.shape == (n, n)
    assert bool(((H == 1) | (H == -1)).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_orders_without_a_construction_say_so():
    assert hadamard_core(172) is None  # Williamson's, not built here
    assert hadamard(11008) is None     # Llama-2's MLP: 43 · 256
    assert hadamard(6) is None         # no Hadamard matrix exists


def test_fast_walsh_hadamard_equals_the_sylvester_product():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    assert torch.allclose(fast_walsh_hadamard(x), x @ sylvester(64), atol=1e-12)


@pytest.mark.parametrize("n,seed", [(576, 3), (1536, None), (64, 0), (11008 // 16, 1)])
def test_a_rotation_is_orthogonal_and_applies_as_its_matrix(n, seed):
    """11008 / 16 = 688 = 43 · 16 takes the random orthogonal fallback."""
    R = Rotation.build(n, seed=seed)
    Q = R.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    x = torch.randn(7, n, dtype=torch.float64)
    assert torch.allclose(R.apply(x), x @ Q, atol=1e-10)
    assert torch.allclose(R.unapply(x), x @ Q.T, atol=1e-10)
    assert R.exact_hadamard == (n != 688)
    if R.exact_hadamard:  # ±1/√n entries: each row spreads evenly over every channel
        assert torch.allclose(Q.abs(), torch.full_like(Q, n**-0.5), atol=1e-12)


def test_the_seed_draws_the_signs():
    a, b, c = (Rotation.build(64, seed=s).matrix() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(Rotation.build(64).matrix().abs(), a.abs())


def test_rows_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="order 64"):
        Rotation.build(64).apply(torch.zeros(2, 32))


@pytest.mark.parametrize("n", [1, 2, 128, 256, 4096])
def test_the_factored_transform_equals_the_sylvester_product_at_every_depth(n):
    """Orders up to FACTOR take one product; 256 two factors; 4096 = 32 · 128 recurses once more."""
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(fast_walsh_hadamard(x), x @ sylvester(n), atol=1e-9)
