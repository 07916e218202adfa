"""The GoodNet's false-rejection promise: conformal thresholds, one detector or several
calibrated together.

Pure arithmetic on synthetic scores (no TensorFlow): many independent draws from one
distribution, calibration on n of them, false rejection measured on fresh ones. The
tolerances come from n and the number of draws, not from tuning."""

import logging

import numpy as np
import pytest

from badnet_repair.defenses.detectors import calibrate
from badnet_repair.experiment.evaluate import detection_at, rejection_p

DRAWS = 2000  # calibrations, each judged on its own fresh clean scores
FRESH = 200


def fresh_rejection(n: int, frr: float, rng: np.random.Generator, draw) -> tuple[float, float]:
    """The mean false rejection over DRAWS joint calibrations on n clean score vectors
    `draw(rng, n)` (n, m), each judged on FRESH new ones (flagged by any detector), and
    the mean promised bound."""
    rates, bounds = [], []
    for _ in range(DRAWS):
        calibration = calibrate(draw(rng, n), frr, "test")
        fresh = draw(rng, FRESH)
        rates.append(np.any(fresh > np.array(calibration.thresholds), axis=1).mean())
        bounds.append(calibration.bound)
    return float(np.mean(rates)), float(np.mean(bounds))


def one(rng, n):
    return rng.standard_normal((n, 1))


def independent(rng, n):
    return rng.standard_normal((n, 3))


def correlated(rng, n):
    """Two detectors that mostly flag the same images (as ours flag B's errors)."""
    shared = rng.standard_normal((n, 1))
    return shared + 0.3 * rng.standard_normal((n, 2))


def standard_error(frr: float, n: int) -> float:
    """Of the mean of DRAWS rates: each varies with its fresh draw and its calibration."""
    return np.sqrt(frr * (1 - frr) * (1 / FRESH + 1 / (n + 2))) / np.sqrt(DRAWS)


@pytest.mark.parametrize(("n", "frr"), [(19, 0.05), (60, 0.05), (120, 0.05), (300, 0.01)])
def test_one_detectors_expected_false_rejection_on_fresh_draws_is_its_bound(n, frr):
    """Split conformal: E[rejection] = 1 - rank/(n + 1) <= frr, with rank the
    ceil((n + 1)(1 - frr))-th smallest score, and above frr - 1/(n + 1); 4 standard errors."""
    rng = np.random.default_rng(n)
    scores = np.arange(float(n))
    rank = int(np.ceil((n + 1) * (1 - frr) - 1e-9))
    calibration = calibrate(scores, frr, "test")
    assert calibration.thresholds == [scores[rank - 1]]
    assert calibration.bound == pytest.approx(1 - rank / (n + 1)) and calibration.bound <= frr
    measured, _ = fresh_rejection(n, frr, rng, one)
    se = standard_error(frr, n)
    assert abs(measured - calibration.bound) < 4 * se, (measured, calibration.bound, se)
    assert measured > frr - 1 / (n + 1) - 4 * se  # not needlessly strict either


@pytest.mark.parametrize("draw", [independent, correlated])
def test_detectors_calibrated_together_keep_the_goodnets_rate(draw):
    """Flagged by any of several detectors, the GoodNet rejects at most its promised bound
    (<= frr) of fresh clean inputs on average, whether the detectors flag different
    images or the same ones."""
    n, frr = 200, 0.05
    measured, bound = fresh_rejection(n, frr, np.random.default_rng(1), draw)
    assert bound <= frr
    assert measured <= bound + 4 * standard_error(frr, n), (measured, bound)


def test_calibrating_together_spends_what_each_at_frr_over_m_would_leave():
    """Where the detectors mostly flag the same images, each at frr / m (Bonferroni)
    rejects far less than frr in all; calibrated together they use the promised rate,
    and flag more of what only they see."""
    rng = np.random.default_rng(2)
    n, frr, rates = 200, 0.05, {"together": [], "each at frr / 2": []}
    for _ in range(500):
        clean, fresh = correlated(rng, n), correlated(rng, FRESH)
        together = np.array(calibrate(clean, frr, "test").thresholds)
        apart = np.array([calibrate(clean[:, j], frr / 2, "test").thresholds[0] for j in (0, 1)])
        rates["together"].append(np.any(fresh > together, axis=1).mean())
        rates["each at frr / 2"].append(np.any(fresh > apart, axis=1).mean())
    together, apart = np.mean(rates["together"]), np.mean(rates["each at frr / 2"])
    assert apart < 0.75 * frr < together <= frr + 4 * standard_error(frr, n) / np.sqrt(500 / DRAWS)


def test_ties_are_counted_against_the_promise():
    """Scores all equal (a disagreement score where the nets always agree): none of them
    can be flagged without flagging all, so only a new input above them all is."""
    calibration = calibrate(np.zeros((120, 2)), 0.05, "test")
    assert calibration.thresholds == [0.0, 0.0]
    assert calibration.bound == pytest.approx(6 / 121)


def test_too_few_calibration_images_use_the_rate_they_support(caplog):
    """19 scores cannot promise 1%: the largest is used, promising 1/20, said in one line;
    two detectors on 30 images cannot promise 5% (their tops are two images)."""
    with caplog.at_level(logging.WARNING):
        got = calibrate(np.arange(19.0), 0.01, "detector x")
    assert got.thresholds == [18.0] and got.bound == pytest.approx(1 / 20)
    assert "detector x: 19 clean calibration images support" in caplog.text
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    two = np.stack([np.arange(30.0), -np.arange(30.0)], axis=1)
    got = calibrate(two, 0.05, "x + y")
    assert got.thresholds == [29.0, 0.0] and got.bound == pytest.approx(2 / 31)


def test_detection_at_a_rate_is_read_where_the_clean_rejection_first_stays_within_it():
    """The operating point of an evaluation: one detector flags above its (k+1)-th largest
    clean score for the largest k within the rate; several share one k, their union's
    clean flags within the rate and one more step past it."""
    clean = np.arange(1.0, 101.0)  # 100 clean scores, 1 ... 100
    poisoned = np.array([100.5, 96.0, 95.0, 94.0])
    # at 5%: the 5 clean scores above 95 are flagged, so 96 and 100.5 are, 95 and 94 not
    assert detection_at(clean, poisoned, 0.05) == 0.5
    assert detection_at(clean, poisoned, 0.0) == 0.25  # above every clean score: 100.5
    assert detection_at(np.full(50, 3.0), np.array([3.0, 4.0]), 0.05) == 0.5  # ties: none
    rng = np.random.default_rng(0)
    two = rng.standard_normal((400, 2))
    attacked = rng.standard_normal((300, 2)) + [2.0, 0.0]
    ordered = -np.sort(-two, axis=0)

    def union(scores, k):
        return (scores > ordered[k]).any(axis=1)

    k = next(k for k in range(400) if union(two, k + 1).mean() > 0.05)
    assert union(two, k).mean() <= 0.05 < union(two, k + 1).mean()
    assert detection_at(two, attacked, 0.05) == union(attacked, k).mean()
    assert np.isnan(detection_at(two[:0], attacked, 0.05))


def test_the_p_of_a_measured_rejection_follows_the_law_of_a_conformal_threshold():
    """`evaluate.rejection_p` judges a measured false rejection by the law of the count of
    m fresh clean scores above the k-th largest of n: beta-binomial. Checked on draws:
    its mean (the sum of its tails) and its tail at three counts, each within four
    standard errors of the draws' share."""
    n, m, k, draws = 60, 200, 3, 4000
    bound = k / (n + 1)
    rng = np.random.default_rng(0)
    thresholds = np.sort(rng.random((draws, n)), axis=1)[:, -k]
    counts = (rng.random((draws, m)) > thresholds[:, None]).sum(axis=1)
    assert rejection_p(0, m, n, bound) == pytest.approx(1)
    assert rejection_p(m, m, 1, 2 / 2) == 1  # a bound of 1 (too few images) promises nothing
    mean = sum(rejection_p(c, m, n, bound) for c in range(1, m + 1))  # E[X] = sum P(X >= c)
    assert mean == pytest.approx(m * bound, rel=1e-9)
    for count in np.percentile(counts, [50, 90, 99]).astype(int):
        share = np.mean(counts >= count)
        error = np.sqrt(share * (1 - share) / draws)
        assert abs(rejection_p(int(count), m, n, bound) - share) <= 4 * error, count
