"""The leaderboard: every repair on every BadNet of a sweep, side by side.

Per BadNet and repair: the repaired net's clean accuracy and its drop from the BadNet's,
ASR per trigger, the DER rating, the GoodNet's detection and false rejection, the wall
time, and whether the goal (ASR <= 0.02 at <= 2 points of accuracy lost) was met; then
each GoodNet detector's figures (`detector_table`). The
best repair per BadNet is marked by a rule that reads clean data only (`best`); the test
and poisoned sets are read for reporting. Written to a sweep's parent run
(`leaderboard.md`, `.csv`, `.png`) when the sweep sets `sweep.leaderboard=true`, and
rebuilt from any MLflow store or server, so a team compares runs made on different
machines:

    python -m badnet_repair.experiment.leaderboard --tracking-uri URI [--experiment NAME ...]
        [--parent RUN_ID] [--out DIR]
"""

import argparse
import math
import sys
from pathlib import Path

import mlflow

from badnet_repair import UserError, files, plots

GOAL_ASR, GOAL_DROP = 0.02, 0.02  # the project's goal for every repair
BUDGET = 0.02  # the clean rule's budget: held-out accuracy lost at most this


def _triggers(row: dict) -> list[str]:
    return sorted(k.split("/", 2)[2] for k in row if k.startswith("repaired/asr/"))


def worst_asr(metrics: dict[str, float], stage: str = "repaired") -> float:
    """The highest ASR of `stage` over the triggers (0 where there is no poisoned set)."""
    return max((v for k, v in metrics.items() if k.startswith(f"{stage}/asr/")), default=0.0)


def der(metrics: dict[str, float]) -> float:
    """The DER rating of a run's metrics: (max(0, dASR) - max(0, dACC) + 1) / 2, with dASR
    the fall of the worst trigger's ASR and dACC the fall of clean accuracy (it reads the
    test and poisoned sets: for reporting, or an oracle objective)."""
    worst, before = worst_asr(metrics), worst_asr(metrics, "badnet")
    d_acc = metrics["badnet/clean_acc"] - metrics["repaired/clean_acc"]
    return (max(0.0, before - worst) - max(0.0, d_acc) + 1) / 2


def badnet_name(params: dict[str, str]) -> str:
    """A BadNet's name in the leaderboard: its model config's, or for `model=custom` its
    file's (a user brings several nets through that one config)."""
    name = params.get("model.name", "?")
    return Path(params.get("model.file", "?")).stem if name == "custom" else name


def entry(run) -> dict:
    """One leaderboard row from a FINISHED run of the pipeline; a declined repair's row
    has no repaired net's numbers and misses the goal."""
    m, p = run.data.metrics, run.data.params
    repair = run.data.tags.get("repair") or p.get("repair", "?")  # a chain's: `a+b`
    row = {"badnet": badnet_name(p), "repair": repair, **m}
    row["model_hash"] = run.data.tags.get("model.content_hash", "")
    row["run"], row["run_id"] = run.info.run_name, run.info.run_id
    if "repaired/clean_acc" not in m:  # declined: no strength within its budget
        row.update(repair=f"{row['repair']} (declined)", drop=math.nan, goal=False)
        return row
    row["drop"] = m["badnet/clean_acc"] - m["repaired/clean_acc"]
    if _triggers(row):
        row["der"] = der(m)
        row["goal"] = worst_asr(m) <= GOAL_ASR and row["drop"] <= GOAL_DROP
    return row


def runs(experiments: list[str] | None, parent: str | None = None) -> list[dict]:
    """The newest FINISHED run per BadNet and repair settings (config hash), as rows; from
    these experiments, or from every one (None: a sweep's points may span several)."""
    query = "attributes.status = 'FINISHED'"
    if parent:
        query += f" and tags.mlflow.parentRunId = '{parent}'"
    found = mlflow.search_runs(
        experiment_names=experiments,
        search_all_experiments=experiments is None,
        filter_string=query,
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return rows_of(found)


def rows_of(found: list) -> list[dict]:
    """The newest of these FINISHED runs (oldest first) per BadNet and repair settings,
    as rows (a sweep hands its points in: `sweep.finished_children`)."""
    found = [run for run in found if "repair" in run.data.params]  # not sweep parents
    latest = {run.data.tags.get("config_hash", run.info.run_id): run for run in found}
    rows = [entry(r) for r in latest.values()]
    hashes: dict[str, set[str]] = {}
    for row in rows:
        hashes.setdefault(row["badnet"], set()).add(row["model_hash"])
    for row in rows:  # two different files of one name: the content hash tells them apart
        if len(hashes[row["badnet"]]) > 1:
            row["badnet"] += f"@{row['model_hash'][:8] or 'unknown'}"
    return sorted(rows, key=lambda row: (row["badnet"], row["repair"]))


def best(rows: list[dict]) -> dict[str, str]:
    """Per BadNet, the run a defender would pick from clean data alone: among repairs
    whose clean held-out accuracy is within `BUDGET` of the BadNet's, the one whose
    reversed triggers (found on the BadNet from clean data) succeed least on it
    (`repaired/probe_asr`), then the higher held-out accuracy. BadNets without a probe
    get no mark: clean accuracy alone cannot see a backdoor."""
    marks = {}
    for badnet in {row["badnet"] for row in rows}:
        ok = [
            row
            for row in rows
            if row["badnet"] == badnet
            and "repaired/probe_asr" in row
            and row["badnet/holdout_acc"] - row["repaired/holdout_acc"] <= BUDGET + 1e-12
        ]
        if ok:
            chosen = min(ok, key=lambda r: (r["repaired/probe_asr"], -r["repaired/holdout_acc"]))
            marks[badnet] = chosen["run_id"]
    return marks


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The columns and the cells, the best repair per BadNet marked with `*`."""
    triggers = sorted({t for row in rows for t in _triggers(row)})
    columns = ["badnet", "repair", "best", "clean_acc", "drop"]
    columns += [f"asr/{t}" for t in triggers] + ["der", "goal", "goodnet_frr"]
    columns += [f"detect/{t}" for t in triggers] + ["probe_asr", "repair_min", "run"]
    marks = best(rows)
    common = set.intersection(*(set(row["run"].split()) for row in rows)) if rows else set()
    cells = []
    for row in rows:
        values = {
            **{c: row.get(c) for c in ("badnet", "repair", "drop", "der", "goal")},
            "run": " ".join(w for w in row["run"].split() if w not in common),  # what differs
            "best": "*" if marks.get(row["badnet"]) == row["run_id"] else "",
            "clean_acc": row.get("repaired/clean_acc"),
            "goodnet_frr": row.get("goodnet/flag_rate_clean"),
            "probe_asr": row.get("repaired/probe_asr"),
            "repair_min": row.get("time/repair_s", math.nan) / 60,
        }
        for t in triggers:
            values[f"asr/{t}"] = row.get(f"repaired/asr/{t}")
            values[f"detect/{t}"] = row.get(f"goodnet/detect/{t}")
        cells.append([_cell(values[c]) for c in columns])
    return columns, cells


TOGETHER = "together"  # the GoodNet's own rule, in the detectors' table


def _detectors(row: dict) -> list[str]:
    """The GoodNet's detectors in a run (those with figures of their own)."""
    ends = "/flag_rate_clean"
    return sorted(
        k.split("/")[1]
        for k in row
        if k.startswith("goodnet/") and k.count("/") == 2 and k.endswith(ends)
    )


def detector_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per BadNet, repair and GoodNet detector, then `together` (the GoodNet's rule):
    false rejection on the clean test set (and the GoodNet's p against its promise, see
    `evaluate.rejection_p`) and, per trigger, detection at the thresholds
    set on clean data, AUROC, and detection where the clean test set's rejection is at
    most 1% and 5% (how well it ranks, at the rates a user asks for)."""
    triggers = sorted({t for row in rows for t in _triggers(row)})
    columns = ["badnet", "repair", "detector", "frr", "frr_p"]
    columns += [f"{what}/{t}" for t in triggers for what in ("detect", "auroc", "at_1%", "at_5%")]
    cells = []
    for row in rows:
        names = _detectors(row)
        for name in [*names, TOGETHER] if names else []:
            key = "goodnet/" if name == TOGETHER else f"goodnet/{name}/"
            values = {"badnet": row["badnet"], "repair": row["repair"], "detector": name}
            values["frr"] = row.get(f"{key}flag_rate_clean")
            p = row.get(f"{key}frr_p")  # the GoodNet's alone (`together`)
            values["frr_p"] = None if p is None else f"{p:.2g}"  # a tiny p is not 0.0000
            for t in triggers:
                values[f"detect/{t}"] = row.get(f"{key}detect/{t}")
                values[f"auroc/{t}"] = row.get(f"{key}auroc/{t}")
                values[f"at_1%/{t}"] = row.get(f"{key}detect_at_frr_0.01/{t}")
                values[f"at_5%/{t}"] = row.get(f"{key}detect_at_frr_0.05/{t}")
            cells.append([_cell(values[c]) for c in columns])
    return columns, cells


def _markdown_table(columns: list[str], cells: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(c) + " |" for c in cells]


def markdown(rows: list[dict]) -> str:
    """The leaderboard, then (where the runs built GoodNets) each detector's figures."""
    lines = _markdown_table(*table(rows))
    met = sorted({row["badnet"] for row in rows if row.get("goal")})
    lines += [
        "",
        f"best (*): clean data only; within {BUDGET:g} of the BadNet's held-out accuracy, the "
        "lowest success of the BadNet's reversed triggers (probe_asr). ASR, detection and "
        "DER read the test and poisoned sets, for reporting only.",
        f"goal (ASR <= {GOAL_ASR:g} at <= {100 * GOAL_DROP:g} points lost) reached on: "
        + (", ".join(met) or "none"),
    ]
    columns, cells = detector_table(rows)
    if cells:
        lines += ["", "GoodNet detectors:", "", *_markdown_table(columns, cells), ""]
        lines.append(
            "frr and detect: at the thresholds set on clean validation data (goodnet.frr); "
            "frr_p: the chance of a false rejection at least frr were the GoodNet's promise "
            "exact (a small one: the test images are not like the calibration ones); "
            "auroc, at_1% and at_5%: how each ranks, detection where the clean test set's "
            "rejection is at most 1% and 5% (read off the test set, for reporting only)."
        )
    return "\n".join(lines) + "\n"


def csv(rows: list[dict]) -> str:
    columns, cells = table(rows)
    return "\n".join([",".join(columns), *(",".join(c) for c in cells)]) + "\n"


def publish(parent_run_id: str, rows: list[dict]) -> str:
    """Log the leaderboard to the sweep's parent run; return its markdown."""
    client = mlflow.MlflowClient()
    text = markdown(rows)
    client.log_text(parent_run_id, text, "leaderboard.md")
    client.log_text(parent_run_id, csv(rows), "leaderboard.csv")
    figure = plots.leaderboard_plot(rows, best(rows))
    client.log_figure(parent_run_id, figure, "leaderboard.png")
    plots.close(figure)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m badnet_repair.experiment.leaderboard",
        description="Rebuild the leaderboard from an MLflow store or server.",
    )
    parser.add_argument("--tracking-uri", required=True, help="sqlite:////abs/path.db or http://")
    parser.add_argument("--experiment", action="append", default=[], help="(default: all)")
    parser.add_argument("--parent", help="only the children of this sweep parent run")
    parser.add_argument("--out", type=Path, help="write leaderboard.md/.csv/.png here")
    args = parser.parse_args(argv)
    try:
        mlflow.set_tracking_uri(args.tracking_uri)
        names = args.experiment or [e.name for e in mlflow.search_experiments()]
        rows = runs(names, args.parent)
        if not rows:
            raise UserError(f"no finished runs in {', '.join(names) or 'the store'}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a store that cannot be read, in one line
        print(
            f"error: --tracking-uri {args.tracking_uri}: {type(e).__name__}: {e}", file=sys.stderr
        )
        return 1
    print(markdown(rows), end="")
    if args.out:
        files.write_text(args.out / "leaderboard.md", markdown(rows))
        files.write_text(args.out / "leaderboard.csv", csv(rows))
        figure = plots.leaderboard_plot(rows, best(rows))
        figure.savefig(args.out / "leaderboard.png", dpi=100)
        plots.close(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
