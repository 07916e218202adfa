"""Random Erasing: exactly one rectangle of the asked size per chosen image, values from
the asked range, the rest of the batch untouched, seeded."""

import numpy as np
import pytest

from badnet_repair.augment import random_erasing
from badnet_repair.network import training


def test_random_erasing_replaces_one_rectangle_per_chosen_image_within_its_area():
    x = np.full((400, 30, 20, 3), 5.0, dtype=np.float32)  # outside the fill range [0, 1]
    out = random_erasing(x, np.random.default_rng(0), 0.5, (0.1, 0.2), (0.0, 1.0))
    changed = (out != x).any(axis=-1)
    erased = changed.any(axis=(1, 2))
    assert 0.4 < erased.mean() < 0.6
    assert x.dtype == out.dtype and np.all(x == 5.0)  # the input is not written to
    for image, mask in zip(out[erased], changed[erased], strict=True):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one full box
        assert mask.sum() == len(rows) * len(cols)
        assert 0.05 * 600 <= mask.sum() <= 0.3 * 600  # within the area, up to rounding
        assert image[mask].min() >= 0.0 and image[mask].max() <= 1.0
    again = random_erasing(x, np.random.default_rng(0), 0.5, (0.1, 0.2), (0.0, 1.0))
    np.testing.assert_array_equal(out, again)


def test_random_erasing_at_probability_zero_or_one():
    x = np.zeros((50, 8, 8, 1), dtype=np.float32)
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(random_erasing(x, rng, 0.0, (0.02, 0.4), (1.0, 2.0)), x)
    every = random_erasing(x, rng, 1.0, (0.02, 0.4), (1.0, 2.0))
    assert (every != 0).any(axis=(1, 2, 3)).all()


def test_the_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    plain, warm = training.cosine(0.1, 100), training.cosine(0.1, 100, warmup=0.1)
    assert float(plain(0.0)) == pytest.approx(0.1)
    assert float(warm(0.0)) == pytest.approx(0.01)  # a tenth of the way up at step 1 of 10
    assert float(warm(4.0)) == pytest.approx(0.05 * (1 + np.cos(np.pi * 0.04)) / 2, rel=1e-5)
    assert float(warm(50.0)) == pytest.approx(float(plain(50.0)))
    assert float(warm(100.0)) == pytest.approx(0.0, abs=1e-9)
