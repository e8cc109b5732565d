"""Keyed random numbers (pipelines/keyed_random.py) and keyed augmentation choices."""
import numba
import numpy as np
import torch
from scipy import stats

from pipelines import augment as A
from pipelines import cpu_augment as C
from pipelines.keyed_random import keys, mix, uniforms
from pipelines.reference import CropRecipe


def _splitmix64_reference(x: int) -> int:
    """SplitMix64's output function on Python integers (arbitrary precision, masked to 64 bits)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix_equals_the_integer_reference_in_numpy_and_numba():
    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 123456789]
    ours = mix(np.array(values, dtype=np.uint64))
    assert ours.tolist() == [_splitmix64_reference(v) for v in values]
    compiled = numba.njit(mix)
    assert [int(compiled(np.uint64(v))) for v in values] == ours.tolist()
    # the well-known first output of a SplitMix64 generator seeded with 0
    assert int(mix(np.zeros(1, dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_keys_are_elementwise_and_uniforms_are_uniform_and_independent():
    index = np.arange(50000)
    k = keys(7, 3, index, 1)
    assert k.shape == (50000,) and len(np.unique(k)) == 50000
    assert k[123] == keys(7, 3, 123, 1)[0]  # a sample's key does not depend on its batch
    assert keys(7, 3, -1, 1)[0] != keys(7, 3, 1, 1)[0]
    u = uniforms(k, 13)
    assert u.shape == (50000, 13) and u.min() >= 0 and u.max() < 1
    for j in range(13):
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-4
    corr = np.corrcoef(u.T) - np.eye(13)
    assert np.abs(corr).max() < 0.025  # 5 sigma of 1/sqrt(50000)
    other_epoch = uniforms(keys(7, 4, index, 1), 13)
    assert abs(np.corrcoef(u[:, 0], other_epoch[:, 0])[0, 1]) < 0.025


def test_keyed_params_follow_the_recipe_and_the_sample_not_the_batch():
    recipe = CropRecipe(16, (0.2, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, flip_p=0.5)
    p = A.keyed_params(1, 2, np.arange(20000), range(2), recipe)
    assert p.shape == (40000, C.NUM_PARAMS)
    for column, prob in ((C.P_JITTER, 0.8), (C.P_GRAY, 0.2), (C.P_BLUR, 0.5), (C.P_FLIP, 0.5)):
        assert abs(p[:, column].mean().item() - prob) < 0.01
    assert (p[:, C.P_ORDER].sort(dim=1).values == torch.arange(4.0)).all()  # a permutation per crop
    sigma = p[:, C.P_SIGMA]
    assert sigma.min() >= recipe.blur_sigma[0] and sigma.max() <= recipe.blur_sigma[1]
    # view-major; the rows of samples 5 and 9 are the same in any batch that holds them
    small = A.keyed_params(1, 2, [9, 5], range(2), recipe)
    assert torch.equal(small[0], p[9]) and torch.equal(small[1], p[5])
    assert torch.equal(small[2], p[20000 + 9]) and torch.equal(small[3], p[20000 + 5])
    assert not torch.equal(A.keyed_params(1, 3, [9], range(1), recipe)[0], p[9])
