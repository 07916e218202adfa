"""MLflow: the store, the experiment, and a run that always ends with an honest status."""

import logging
import platform
import signal
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from badnet_repair import UserError

log = logging.getLogger(__name__)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri[len("sqlite:///") :]))


def prepare(uri: str, experiment: str, artifact_root: str) -> str:
    """Create the store and experiment if needed; return the experiment id.

    A new experiment stores its artifacts under `artifact_root/<experiment>` as an
    absolute path, so runs started from any working directory share one store.
    """
    db = sqlite_path(uri)
    if db is not None:
        if not db.is_absolute():
            raise UserError(
                f"tracking.uri={uri}: a SQLite path must be absolute (sqlite:////abs/path)"
            )
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"tracking.uri={uri}: cannot create {db.parent} ({e})") from None
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        location = Path(artifact_root).resolve() / experiment
        return mlflow.create_experiment(experiment, artifact_location=location.as_uri())
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(
            f"tracking.uri={uri}: MLflow store not reachable ({type(e).__name__}: {e})"
        ) from None


_STORE_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "alembic")


def _outermost_store_frame(frame):
    """The outermost frame of a call into MLflow or its database the main thread was
    stopped in, else None."""
    outermost = None
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_STORE_MODULES):
            outermost = frame
        frame = frame.f_back
    return outermost


def _interrupt(signum, frame):
    """Raise KeyboardInterrupt; inside a call into MLflow, as that call returns.

    An interrupt that lands in SQLite's `execute` leaves the database locked, so the run
    could not then be ended KILLED (20 s of retries, then an error, the run left RUNNING).
    A profile hook raises it when the store's outermost frame returns, its session closed.
    """
    store_call = _outermost_store_frame(frame)
    if store_call is None:
        raise KeyboardInterrupt(f"signal {signum}")
    previous = sys.getprofile()
    if getattr(previous, "deferred_interrupt", False):
        return  # a second signal in the same call: one interrupt is already on its way

    def on_return(called, event, arg):
        if event == "return" and called is store_call:
            sys.setprofile(previous)
            raise KeyboardInterrupt(f"signal {signum}")

    on_return.deferred_interrupt = True
    sys.setprofile(on_return)


def interrupt_on_signals() -> dict:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt outside calls into the store, so
    runs end KILLED and files are cleaned up; returns the previous handlers (none off the
    main thread, where they cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


@contextmanager
def tracked_run(experiment_id: str, run_name: str, tags: dict | None = None) -> Iterator[str]:
    """An MLflow run that ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM."""
    previous = interrupt_on_signals()
    try:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags or {})
        yield run.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))  # no-op if none was started
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (`prune.sparsity`), string values."""
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return out


def machine() -> str:
    """The CPU a run trained on, for its `machine` tag: repairs train deterministically on
    one CPU but not across CPUs (the demo's default chain ended at ASR 0.001 on one
    machine and 0.283 on another), so a figure is only comparable with its machine's."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        described = describe_cpu(cpuinfo.read_text(errors="replace"))
        if described:
            return described
    return platform.processor() or platform.machine() or "unknown"


def describe_cpu(cpuinfo: str) -> str:
    """The first processor of /proc/cpuinfo: its model name, family, model and stepping, and
    the widest vector instructions TensorFlow's kernels can choose (AVX-512 or AVX2). Two
    CPUs that both call themselves "AMD EPYC" gave the demo different numbers; the model
    name alone could not tell them apart."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    if not name:
        return ""
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    flags = set(fields.get("flags", "").split())
    vector = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{name} ({', '.join([*ids, vector])})"
