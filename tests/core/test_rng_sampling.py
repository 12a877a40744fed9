import torch

from atoll import rng, sampling


def test_keys_depend_on_every_counter_and_not_on_order():
    k = rng.key(0, 3, 7, "batches")
    assert k == rng.key(0, 3, 7, "batches")
    others = {rng.key(1, 3, 7, "batches"), rng.key(0, 4, 7, "batches"),
              rng.key(0, 3, 8, "batches"), rng.key(0, 3, 7, "noise")}
    assert k not in others and len(others) == 4
    a = torch.rand(5, generator=rng.generator(rng.key(0, 1, 2, "x")))
    torch.rand(100, generator=rng.generator(rng.key(0, 1, 3, "x")))  # another client first
    b = torch.rand(5, generator=rng.generator(rng.key(0, 1, 2, "x")))
    assert torch.equal(a, b)


def test_fixed_sampling_without_replacement_and_reproducible():
    c = sampling.sample(100, 5, 0, count=10)
    assert len(c) == len(set(c)) == 10 and c == sorted(c)
    assert c == sampling.sample(100, 5, 0, count=10)
    assert c != sampling.sample(100, 6, 0, count=10)
    assert len(sampling.sample(100, 1, 0, fraction=0.25)) == 25
    assert sampling.sample(7, 1, 0) == list(range(7))  # default: everyone


def test_poisson_sampling_rate():
    sizes = [len(sampling.sample(1000, r, 0, method="poisson", rate=0.05)) for r in range(1, 201)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 2.0  # std of the mean ~ 0.49
    assert len(set(sizes)) > 5  # cohort size varies


def test_sampling_errors_name_the_key():
    import pytest
    with pytest.raises(ValueError, match="clients_per_round"):
        sampling.sample(5, 1, 0, count=6)
    with pytest.raises(ValueError, match="sampling.rate"):
        sampling.sample(5, 1, 0, method="poisson", rate=0)
