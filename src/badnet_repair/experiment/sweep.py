"""Sweeps as one MLflow object: a parent run per multirun, a child per point, a summary.

Hydra calls `MlflowSweep` around every multirun, whatever the launcher or sweeper. The
store, the experiment and the parent run are created once here, before any job starts
(parallel jobs creating a SQLite store race on its schema), and the parent's id reaches
each job through a file in the sweep folder, which works for local processes and for
cluster jobs on a shared file system alike.
"""

import hashlib
import json
import logging
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from badnet_repair import files, plots
from badnet_repair.experiment import leaderboard, tracking
from badnet_repair.experiment.evaluate import ORACLES

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"


# Keys that say where outputs go or whether to rerun, not what a point computes.
NOT_THE_POINT = ("paths.output_dir", "sweep.resume")
# Keys that follow from another swept key (a model config sets its files and layer).
FOLLOWERS = ("data.", "model.file", "model.layer", "model.builder", "model.architecture")


def config_hash(cfg: DictConfig) -> str:
    """Fingerprint of what a job computes: its resolved config minus `NOT_THE_POINT`."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in NOT_THE_POINT:
        group, name = key.split(".")
        resolved.get(group, {}).pop(name, None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def read_parent(sweep_dir: str | Path) -> str | None:
    """The parent run id written by `MlflowSweep` for this multirun, if any."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def finished_children(parent_run_id: str, fingerprint: str | None = None):
    """FINISHED children of a sweep's parent run, oldest first; only one config's if given.
    Searched in every experiment: a point's experiment follows its config (by default its
    model's name), so `-m model=a,b` logs its points in experiments a and b."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'"
    if fingerprint:
        query += f" and tags.config_hash = '{fingerprint}'"
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=query,
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


_open: dict[str, str] = {}  # the parent run of the multirun this process is carrying out


def end_open_parent(error: BaseException) -> None:
    """A multirun that stops early (bad input, Ctrl-C, SIGTERM, a failed point) never reaches
    `on_multirun_end`: end its parent run KILLED or FAILED, so it is not left RUNNING.
    Rerunning the sweep reopens it."""
    if not _open or (isinstance(error, SystemExit) and error.code in (0, None)):
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        mlflow.MlflowClient(_open["uri"]).set_terminated(_open["run_id"], status)
    except Exception as e:  # noqa: BLE001 - the store may be what failed
        log.warning("sweep parent run %s not marked %s: %s", _open["run_id"], status, e)
    _open.clear()


class MlflowSweep(Callback):
    """Creates (or, on a rerun of the same sweep, reopens) the parent run; summarises at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        overrides = [o for o in config.hydra.overrides.task if not o.startswith("sweep.resume=")]
        name = " ".join(overrides) or "sweep"
        sweep_id = hashlib.sha256(f"{config.tracking.experiment}|{name}".encode()).hexdigest()[:12]
        experiment_id = tracking.prepare(
            config.tracking.uri, config.tracking.experiment, config.tracking.artifact_root
        )
        client = mlflow.MlflowClient()
        found = client.search_runs(
            [experiment_id], f"tags.sweep_id = '{sweep_id}' and tags.sweep_parent = 'true'"
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            log.info("sweep %s: continuing parent run %s", sweep_id, run_id)
        else:
            tags = {"sweep_id": sweep_id, "sweep_parent": "true"}
            run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            log.info("sweep %s: parent run %s '%s'", sweep_id, run_id, name)
        record = {"run_id": run_id, "experiment_id": experiment_id, "sweep_id": sweep_id}
        files.write_text(Path(config.hydra.sweep.dir) / PARENT_FILE, json.dumps(record))
        _open.update(uri=config.tracking.uri, run_id=run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        record = json.loads((Path(config.hydra.sweep.dir) / PARENT_FILE).read_text())
        mlflow.set_tracking_uri(config.tracking.uri)
        children = finished_children(record["run_id"])  # searched once for all below
        table = summarise(record["run_id"], children)
        print(f"\nSweep {record['sweep_id']} (MLflow parent run {record['run_id']}):\n")
        print(table or "no finished points")
        elsewhere = _other_experiments(record["experiment_id"], children)
        if elsewhere:
            print(
                f"\nThe points are in the experiments {', '.join(elsewhere)} (tracking.experiment "
                f"follows each point's config), the parent run in '{config.tracking.experiment}'"
                ": set tracking.experiment=NAME to keep a sweep in one experiment."
            )
        if config.sweep.leaderboard:
            rows = leaderboard.rows_of(children)
            print(
                "\nLeaderboard:\n\n"
                + (leaderboard.publish(record["run_id"], rows) if rows else "none")
            )
        if config.sweep.objective.value in ORACLES:
            print(
                f"\nsweep.objective={config.sweep.objective.value} is an oracle: it reads the "
                "clean test and poisoned sets, which no defender has; a choice made with it "
                "is not one a defender could make."
            )
        mlflow.MlflowClient().set_terminated(record["run_id"], "FINISHED")
        _open.clear()


def _other_experiments(experiment_id: str, children: list) -> list[str]:
    """Names of the experiments, other than the parent's, that hold these points of a
    sweep (its `finished_children`)."""
    ids = {run.info.experiment_id for run in children} - {experiment_id}
    client = mlflow.MlflowClient()
    return sorted(client.get_experiment(i).name for i in ids)


def _rows(children: list) -> tuple[list[dict], set[str], set[str]]:
    """One row per sweep point (the newest of `finished_children` per config), the param
    names, and the series logged per step, whose last value is not a result (each run
    lists its series in the tag `series`)."""
    latest = {run.data.tags.get("config_hash"): run for run in children}
    rows = [
        {"run": run.info.run_name, **run.data.params, **run.data.metrics} for run in latest.values()
    ]
    params = {k for run in latest.values() for k in run.data.params}
    series = {s for run in latest.values() for s in run.data.tags.get("series", "").split(",")}
    return rows, params, series


def swept_keys(rows: list[dict], params: set[str]) -> list[str]:
    """Params that differ between points (what the sweep varied), most values first;
    only those every point has (a repair's own settings are absent from other repairs')."""
    varying = [
        k
        for k in params
        if k not in NOT_THE_POINT
        and not k.startswith(FOLLOWERS)
        and all(k in row for row in rows)  # a repair's own key is not swept across repairs
        and len({row[k] for row in rows}) > 1
    ]
    return sorted(varying, key=lambda k: (-len({row.get(k) for row in rows}), k))


def _metric_columns(rows: list[dict], not_results: set[str]) -> list[str]:
    """Results in reading order: the BadNet's, the repairs' own stages, the repaired net's,
    the GoodNet's, the rest (a repair's own figures, times), the objective."""
    names = {k for row in rows for k in row if k not in not_results and k != "run"}
    middle = plots.intermediate_stages(rows)

    def rank(name: str) -> tuple[int, str]:
        stage = name.split("/")[0]
        order = {"badnet": 0, "repaired": 2, "goodnet": 3, "objective": 5}
        return (order.get(stage, 1 if stage in middle else 4), name)

    return sorted(names, key=rank)


def summarise(parent_run_id: str, children: list) -> str:
    """Log the table (CSV, markdown) and curve plot of the sweep's points `children` (its
    `finished_children`) to the parent; return the markdown."""
    rows, params, series = _rows(children)
    if not rows:
        return ""
    keys = swept_keys(rows, params)
    metrics = _metric_columns(rows, params | series)
    columns = ["run", *keys, *metrics]
    rows.sort(key=lambda row: tuple((plots.as_number(row.get(k)), str(row.get(k))) for k in keys))

    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    csv = "\n".join(
        [",".join(columns), *(",".join(cell(row.get(c, "")) for c in columns) for row in rows)]
    )
    markdown = "\n".join(
        [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows),
        ]
    )
    client = mlflow.MlflowClient()
    client.log_text(parent_run_id, csv + "\n", "summary.csv")
    client.log_text(parent_run_id, markdown + "\n", "summary.md")
    if keys:
        figure = plots.sweep_plot(rows, keys[0], keys[1:])
        client.log_figure(parent_run_id, figure, "sweep.png")
        plots.close(figure)
    return markdown
