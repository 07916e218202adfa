"""The GoodNet's false-rejection promise: conformal thresholds and their union.

Pure arithmetic on synthetic scores (no TensorFlow): many independent draws from one
distribution, calibration on n of them, false rejection measured on fresh ones. The
tolerances come from n and the number of draws, not from tuning."""

import logging

import numpy as np
import pytest

from badnet_repair.defenses.detectors import calibrate

DRAWS = 2000  # calibrations, each judged on its own fresh clean scores
FRESH = 200


def fresh_rejection(n: int, frr: float, rng: np.random.Generator, detectors: int = 1) -> float:
    """The mean false rejection over DRAWS calibrations on n clean scores, of `detectors`
    independent scores each calibrated at frr / detectors and flagged by any."""
    rates = []
    for _ in range(DRAWS):
        flagged = np.zeros(FRESH, bool)
        for _ in range(detectors):
            calibration = calibrate(rng.standard_normal(n), frr / detectors, "test")
            flagged |= rng.standard_normal(FRESH) > calibration.threshold
        rates.append(flagged.mean())
    return float(np.mean(rates))


@pytest.mark.parametrize(("n", "frr"), [(19, 0.05), (60, 0.05), (120, 0.05), (300, 0.01)])
def test_expected_false_rejection_on_fresh_draws_is_within_the_bound(n, frr):
    """Split conformal: E[rejection] = 1 - rank/(n + 1) <= frr, and above frr - 1/(n + 1).
    The mean of DRAWS rates estimates it with standard error at most
    sqrt(frr (1 - frr) / FRESH + Var(bound draw)) / sqrt(DRAWS); 4 standard errors."""
    rng = np.random.default_rng(n)
    bound = calibrate(np.zeros(n), frr, "test").bound
    measured = fresh_rejection(n, frr, rng)
    se = np.sqrt(frr * (1 - frr) * (1 / FRESH + 1 / (n + 2))) / np.sqrt(DRAWS)
    assert bound <= frr + 1e-12
    assert abs(measured - bound) < 4 * se, (measured, bound, se)
    assert measured > frr - 1 / (n + 1) - 4 * se  # not needlessly strict either


def test_too_few_calibration_images_use_the_rate_they_support(caplog):
    """19 scores cannot promise 1%: the largest is used, promising 1/20, said in one line."""
    scores = np.arange(19.0)
    with caplog.at_level(logging.WARNING):
        got = calibrate(scores, 0.01, "detector x")
    assert got.threshold == 18.0 and got.bound == pytest.approx(1 / 20)
    assert "detector x: 19 clean calibration images support" in caplog.text
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


def test_the_union_of_detectors_keeps_the_goodnets_rate():
    """Three detectors flagged by any, each calibrated at frr/3 (Bonferroni): the union's
    false rejection stays within frr; each at frr would have rejected about 3 frr."""
    rng = np.random.default_rng(0)
    n, frr = 200, 0.05
    union = fresh_rejection(n, frr, rng, detectors=3)
    se = np.sqrt(frr / FRESH) / np.sqrt(DRAWS)
    assert union <= frr + 4 * se, union
    naive = []
    for _ in range(200):
        flagged = np.zeros(FRESH, bool)
        for _ in range(3):
            calibration = calibrate(rng.standard_normal(n), frr, "test")
            flagged |= rng.standard_normal(FRESH) > calibration.threshold
        naive.append(flagged.mean())
    assert np.mean(naive) > 2 * frr  # the promise is broken without the split
