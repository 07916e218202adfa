"""Every GoodNet detector alone, and the default pair together, at goodnet.frr 0.05 and
0.01, from runs' saved scores: prints what issue #21's "Done when" asks per net and
detector. Not a test.

A run saves every detector's scores (`goodnet_scores.npz`: `NAME.calibration` on the
clean images it may be calibrated on, `NAME.clean_test`, `NAME.poisoned.TRIGGER`), so one
run with all the
detectors answers for each of them alone at any rate: its threshold is set here by the
shipped rule (`detectors.calibrate`) on its own calibration scores, as a run with that
detector alone would set it. Run the nets once with every detector, then read them back:

    python run.py -m model=demo,demo_blend,demo_bn,demo_lowrate,demo_multi,demo_shapes \\
        "goodnet.detector=[disagreement,badexpert,strip,scale_up,teco]" \\
        tracking.experiment=detectors
    python benchmarks/detector_rates.py --experiment detectors

Per net and detector (and the pair `disagreement+badexpert`, calibrated together, both
on the held-out split), at each rate: the calibration images n, the promised rate
(`bound`: the asked one, or the larger one n supports), detection per trigger / the
false rejection measured on the clean test set (its sampling error, and p below; judged
against the bound, not the asked rate, for where n cannot support the rate the run says
so and promises the bound); then AUROC and detection at 1% and 5% measured false
rejection.

The sampling error of a measured false rejection: the threshold is the k-th largest of n
calibration scores, so the share of new clean inputs above it is Beta(k, n + 1 - k)
distributed over calibration draws, variance b (1 - b) / (n + 2) with b = k / (n + 1) the
bound; the test set of m images adds the binomial b (1 - b) / m. The error is the square
root of their sum. Whether a measured rate is within it is judged exactly, not by a normal
band (at frr 0.01 on 120 images k is 1 and Beta(1, 120) is far from normal: it exceeds
its mean + 2 standard deviations 5.0% of the time, not 2.3%): the count of rejected test
images is then beta-binomial, BB(m, k, n + 1 - k), and `p` is the chance of a count at
least the one measured were the promise exact (`evaluate.rejection_p`, which a run logs
for its GoodNet as `goodnet/frr_p`). Scores with ties (disagreement's many
zeros) flagged strictly above their threshold only reject less, so p is conservative; for
the pair, k is read off its joint bound (an approximation). A table holds many
comparisons, so a rate is **over** where p < 0.05 / (their number) (Bonferroni: a
promise kept everywhere marks one in twenty tables); the footer counts the p below 0.05,
about one in twenty of them where every promise holds. Several runs of one net (other
seeds: other held-out splits, repairs and draws) are pooled in a last table, and each
detector over every net, where a bias the nets share (say, held-out images that the
repair chose its strength on) would show: their rejected share of all their test images,
against the mean bound, and twice the mean of their p, a p-value whatever their
dependence. (Their summed count's law would be sharper, but only for runs on disjoint
data: runs of one net score the same test file and draw their held-out splits from one
validation file, a clean twin reads its BadNet's files, and the store does not say
which files hold the same images.) The
thresholds are the shipped rule's, disagreement's with the margin its `place` adds.

Usage: python benchmarks/detector_rates.py [--tracking-uri URI ...] [--experiment NAME ...]
"""

import logging
import math
import tempfile

import numpy as np
import stored_runs

RATES = (0.05, 0.01)
PAIR = ("disagreement", "badexpert")  # the default GoodNet's detectors


def fetch(uri: str, experiments: list[str], folder: str) -> list[dict]:
    """Finished runs with saved scores in store `uri`: their model and scores."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [
        e.experiment_id
        for e in client.search_experiments()
        if not experiments or e.name in experiments
    ]
    found = []
    for run in client.search_runs(ids, "attributes.status = 'FINISHED'") if ids else []:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if "goodnet_scores.npz" not in names:
            continue
        path = client.download_artifacts(run.info.run_id, "goodnet_scores.npz", folder)
        with np.load(path) as saved:
            scores = {key: saved[key] for key in saved.files}
        found.append({"model": run.data.params.get("model.name", "?"), "scores": scores})
    return found


def judged(scores: dict, names: tuple[str, ...], frr: float) -> dict:
    """`names` calibrated together at `frr` on their calibration scores; what they flag,
    and the chance `p` of rejecting as many clean test images or more were the promise
    exact."""
    from badnet_repair.defenses.detectors import calibrate, disagreement
    from badnet_repair.experiment.evaluate import auroc, detection_at, rejection_p

    calibration = np.stack([scores[f"{n}.calibration"] for n in names], axis=1)
    found = calibrate(calibration, frr, "rescoring")  # the shipped conformal rule
    margins = [disagreement.MARGIN if n == "disagreement" else 0.0 for n in names]
    thresholds = np.array(found.thresholds) + margins  # as each detector's `place` sets it

    def stacked(part: str) -> np.ndarray:
        return np.stack([scores[f"{n}.{part}"] for n in names], axis=1)

    clean = stacked("clean_test")
    triggers = sorted({k.split(".poisoned.", 1)[1] for k in scores if ".poisoned." in k})
    count = int(np.sum((clean > thresholds).any(axis=1)))
    b, n, m = found.bound, found.size, len(clean)
    error = math.sqrt(b * (1 - b) / (n + 2) + b * (1 - b) / m)
    row = {"n": n, "bound": b, "rejected": count / m, "error": error, "count": count}
    row |= {"m": m, "p": rejection_p(count, m, n, b)}
    for t in triggers:
        poisoned = stacked(f"poisoned.{t}")
        row[f"detect/{t}"] = float(np.mean((poisoned > thresholds).any(axis=1)))
        row[f"auroc/{t}"] = auroc(clean[:, 0], poisoned[:, 0]) if len(names) == 1 else math.nan
        for rate in (0.01, 0.05):
            row[f"at_{rate:g}/{t}"] = detection_at(clean, poisoned, rate)
    return row


Judged = tuple[str, tuple[str, ...], list[dict]]  # net, choice, a row per rate


def judged_runs(runs: list[dict]) -> list[Judged]:
    """Per run (by net) and choice (each detector alone, then the pair): a row per rate."""
    found = []
    for run in sorted(runs, key=lambda r: r["model"]):
        scores = run["scores"]
        names = sorted({k.split(".", 1)[0] for k in scores})
        choices = [(n,) for n in names] + ([PAIR] if set(PAIR) <= set(names) else [])
        for choice in choices:
            rows = [judged(scores, choice, frr) for frr in RATES]
            found.append((run["model"], choice, rows))
    return found


def footer(ps: list[float], what: str) -> str:
    """How many of the comparisons' p are below 0.05, the smallest, and the Bonferroni line."""
    low = sum(p < 0.05 for p in ps)
    return (
        f"{len(ps)} comparisons of {what}: p < 0.05 in {low} (about {0.05 * len(ps):.1f} where "
        f"every promise holds); smallest p {min(ps):.2g}; **over** where p < 0.05 / "
        f"{len(ps)} = {0.05 / len(ps):.2g}"
    )


def table(runs: list[dict]) -> str:
    """One row per net and detector (then the pair): at each rate, detected / rejected,
    its error and p (**over** past Bonferroni); then AUROC, at 1% and at 5%. Then, where
    a net has several runs, the rates pooled over them."""
    found = judged_runs(runs)
    cut = 0.05 / (len(found) * len(RATES))
    head = " | ".join(f"frr {frr:g}: n, bound, detected / rejected (error, p)" for frr in RATES)
    lines = [
        f"| net | detector | {head} | AUROC | at 1% | at 5% |",
        "|---|---|" + "---|" * len(RATES) + "---|---|---|",
    ]
    for model, choice, rows in found:
        triggers = sorted(k.split("/", 1)[1] for k in rows[0] if k.startswith("detect/"))

        def per(row: dict, what: str, triggers=triggers) -> str:
            return ", ".join(f"{row[f'{what}/{t}']:.3f}" for t in triggers)

        cells = [
            f"{r['n']}, {r['bound']:.4f}, {per(r, 'detect')} / {r['rejected']:.3f} "
            f"({r['error']:.3f}, p {r['p']:.2g}){' **over**' if r['p'] < cut else ''}"
            for r in rows
        ]
        auroc = per(rows[0], "auroc") if len(choice) == 1 else ""
        lines.append(
            f"| {model} | {'+'.join(choice)} | {' | '.join(cells)} | {auroc} | "
            f"{per(rows[0], 'at_0.01')} | {per(rows[0], 'at_0.05')} |"
        )
    lines += ["", footer([r["p"] for *_, rows in found for r in rows], "single runs")]
    return "\n".join(lines + pooled(found))


def pooled(found: list[Judged]) -> list[str]:
    """Per net with several runs and choice (then each choice over every net): at each
    rate, the mean bound, the rejected share of all their test images and twice the mean
    of their p, a p-value whatever their dependence."""
    groups: dict[tuple[str, tuple[str, ...]], list[list[dict]]] = {}
    for model, choice, rows in found:
        groups.setdefault((model, choice), []).append(rows)
    groups = {key: runs for key, runs in groups.items() if len(runs) > 1}
    if len({model for model, *_ in found}) > 1:  # and each choice over every net
        for _, choice, rows in found:
            groups.setdefault(("every net", choice), []).append(rows)
    if not groups:
        return []
    cut = 0.05 / (len(groups) * len(RATES))
    head = " | ".join(f"frr {frr:g}: bound, rejected (p)" for frr in RATES)
    lines = ["", f"| net | detector | runs | {head} |", "|---|---|---|" + "---|" * len(RATES)]
    ps = []
    for (model, choice), runs in groups.items():
        cells = []
        for i in range(len(RATES)):
            rows = [run[i] for run in runs]
            p = min(1.0, 2 * float(np.mean([r["p"] for r in rows])))
            ps.append(p)
            rejected = sum(r["count"] for r in rows) / sum(r["m"] for r in rows)
            bound = float(np.mean([r["bound"] for r in rows]))
            cells.append(f"{bound:.4f}, {rejected:.3f} (p {p:.2g}){' **over**' if p < cut else ''}")
        lines.append(f"| {model} | {'+'.join(choice)} | {len(runs)} | {' | '.join(cells)} |")
    return lines + ["", footer(ps, "runs pooled")]


def main(argv: list[str] | None = None) -> int:
    args = stored_runs.arguments(__doc__.split("\n\n")[0], argv)
    logging.getLogger("badnet_repair").setLevel(logging.ERROR)  # the rule's own lines
    with tempfile.TemporaryDirectory() as folder:
        runs = [r for uri in args.tracking_uri for r in fetch(uri, args.experiment, folder)]
    none = "no finished run with saved detector scores (goodnet_scores.npz) found"
    return stored_runs.report(runs, table, none)


if __name__ == "__main__":
    raise SystemExit(main())
