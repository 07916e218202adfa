"""The GoodNet's false rejection over draws of the held-out split: prints what issue #21's
promise is about. Not a test.

The detectors' thresholds are conformal: the promise is that false rejection on new clean
inputs is at most `goodnet.frr` *in expectation over the calibration draw*. One run is
one draw (the held-out split is drawn with the run's `seed`), and on the demo 120 images
decide it: seed 0's holds 1 of B's errors, where 5 are expected. So the promise is read
over seeds. Run the same configuration at several seeds, then read the runs back:

    python run.py -m model=demo,demo_blend seed=0,1,2,3,4 tracking.experiment=draws
    python benchmarks/goodnet_draws.py --experiment draws

Per BadNet (and repair, detectors, frr), it prints each seed's clean accuracy and ASR of
the repaired net, the GoodNet's false rejection on the clean test set and its detection
per trigger, then their mean over seeds with the mean's standard error (sample standard
deviation / sqrt(seeds)), beside the promised rate (`frr_bound`, which every detector
logs: the GoodNet's, since its detectors are calibrated together; before 2026-12-04,
night, each detector's share, to be added up).

Usage: python benchmarks/goodnet_draws.py [--tracking-uri URI ...] [--experiment NAME ...]
"""

import math
from collections import defaultdict

import stored_runs

GROUP = ("model.name", "goodnet.detector", "goodnet.frr")


def fetch(uri: str, experiments: list[str]) -> list[dict]:
    """Finished runs of `experiments` (every experiment where none is named) in store `uri`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [
        e.experiment_id
        for e in client.search_experiments()
        if not experiments or e.name in experiments
    ]
    found = client.search_runs(ids, "attributes.status = 'FINISHED'") if ids else []
    return [
        {"params": r.data.params, "tags": r.data.tags, "metrics": r.data.metrics}
        for r in found
        if "seed" in r.data.params and "goodnet/flag_rate_clean" in r.data.metrics
    ]


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (nan with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def table(runs: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        key = (*(run["params"].get(k, "?") for k in GROUP), run["tags"].get("repair", "?"))
        groups[key].append(run)
    lines = []
    for (badnet, detector, frr, repair), members in sorted(groups.items()):
        members.sort(key=lambda r: int(r["params"]["seed"]))
        triggers = sorted(
            k.removeprefix("goodnet/detect/")
            for k in members[0]["metrics"]
            if k.startswith("goodnet/detect/")
        )
        bound = max(v for k, v in members[0]["metrics"].items() if k.endswith("/frr_bound"))
        lines += [
            f"\n{badnet}, repair {repair}, detector {detector}, frr {frr} (frr_bound {bound:.4f})",
            "| seed | repaired clean acc | repaired ASR | GoodNet false rejection | detected | "
            "held-out errors of B |",
            "|---|---|---|---|---|---|",
        ]
        frrs, detected = [], defaultdict(list)
        for run in members:
            m = run["metrics"]
            errors = round((1 - m.get("badnet/holdout_acc", math.nan)) * _held_out(m))
            asr = ", ".join(f"{m.get(f'repaired/asr/{t}', math.nan):.3f}" for t in triggers)
            found = ", ".join(f"{m[f'goodnet/detect/{t}']:.3f}" for t in triggers)
            frrs.append(m["goodnet/flag_rate_clean"])
            for t in triggers:
                detected[t].append(m[f"goodnet/detect/{t}"])
            lines.append(
                f"| {run['params']['seed']} | {m.get('repaired/clean_acc', math.nan):.3f} | "
                f"{asr} | {m['goodnet/flag_rate_clean']:.3f} | {found} | {errors} |"
            )
        mean, error = mean_and_error(frrs)
        found = ", ".join("{:.3f} +- {:.3f}".format(*mean_and_error(detected[t])) for t in triggers)
        lines.append(f"| mean of {len(members)} | | | **{mean:.3f} +- {error:.3f}** | {found} | |")
    return "\n".join(lines)


def _held_out(metrics: dict) -> float:
    """The held-out split's size, as a detector logged it."""
    sizes = [v for k, v in metrics.items() if k.endswith("/calibration_images")]
    return max(sizes) if sizes else math.nan


def main(argv: list[str] | None = None) -> int:
    args = stored_runs.arguments(__doc__.split("\n\n")[0], argv)
    runs = [r for uri in args.tracking_uri for r in fetch(uri, args.experiment)]
    return stored_runs.report(runs, table, "no finished run with a GoodNet found")


if __name__ == "__main__":
    raise SystemExit(main())
