"""Shared fixtures: the demo BadNet is built once per test session; every test has MLflow
pointed at a store of its own; `run_py` runs `run.py` in a subprocess. The summary of a
run names the tests not marked `slow` that took over SLOW_SECONDS."""

import atexit
import contextlib
import fcntl
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import badnet_repair  # noqa: F401  (selects tf_keras before TensorFlow loads)
from badnet_repair import data
from badnet_repair.defenses import detectors
from badnet_repair.experiment import config, inputs, pipeline, tracking
from badnet_repair.network import models
from badnet_repair.network.models import keras  # tf_keras, chosen by badnet_repair first
from badnet_repair.zoo import builds as demo
from badnet_repair.zoo import recipes as zoo

ROOT = config.project_root()
SHARED = Path(ROOT).parent / "shared" / "csaw-hackml-2020"

config.register()

# Tiny settings per repair for end-to-end tests; a repair without an entry runs at its defaults.
TINY = {
    "fine_pruning": ["finetune.epochs=1"],
    "magnitude": ["finetune.epochs=1", "prune.sparsities=[0.5]", "prune.max_acc_drop=0.5"],
    "finetune": ["finetune.epochs=1"],
    "neural_cleanse": [
        "neural_cleanse.screen_rounds=1",
        "neural_cleanse.candidates=2",
        "neural_cleanse.references=4",
        "neural_cleanse.rounds=2",
        "neural_cleanse.round_batches=2",
        "neural_cleanse.batch_size=8",  # a quarter of the default: the screen is most of a run
        "finetune.epochs=1",
    ],
    "ft_sam": ["ft_sam.steps=5", "ft_sam.lrs=[0.001]"],  # within budget: one rung, no halving
    "i_bau": ["i_bau.rounds=2", "i_bau.steps=2", "i_bau.uap_steps=2", "i_bau.eps=[0.01]"],
    "rnp": ["rnp.unlearn_steps=5", "rnp.mask_steps=5", "rnp.max_acc_drop=0.5"],
    "anp": ["anp.steps=5", "anp.max_acc_drop=0.5"],
    "sau": ["sau.steps=3", "sau.eps=[0.05]", "sau.pgd_steps=2"],
    "bti_dbf": [
        "bti_dbf.rounds=1",
        "bti_dbf.mask_steps=2",
        "bti_dbf.gen_steps=2",
        "bti_dbf.unlearn_steps=2",
        "bti_dbf.lrs=[0.0001]",
        "bti_dbf.max_acc_drop=0.99",
    ],
    "seam": [
        "seam.forget_steps=3",
        "seam.recover_steps=3",
        "seam.recover_lrs=[0.01]",
        "seam.max_acc_drop=0.99",
    ],
}

# The GoodNet of every detector at tiny settings, calibrated together (on a fine-tuned net).
EVERY_DETECTOR = [
    "repair=finetune",
    "finetune.epochs=1",
    "goodnet.k=4",
    "goodnet.teco_corruptions=[contrast,brightness]",  # 10 copies, not 30
    "goodnet.scale_up_factors=[3,5]",  # 2 copies, not 5
    "goodnet.expert_epochs=1",
    "++ft_sam.steps=3",  # BaDExpert's own FT-SAM auxiliary (auto: finetune has no FT-SAM)
    "++ft_sam.lrs=[0.001]",
    f"goodnet.detector=[{','.join(detectors.names())}]",
]

# The test files that take longest on 2 cores (2026-12-05, late afternoon, on an AVX2-only
# machine about 2.3 times slower than docs/development.md's earlier figures: 340, 303, 302,
# 241, 208, 192, 157, 122 and 106 s), handed out first: `make test` gives each of its two
# workers a whole file at a time (--dist loadfile, in collection order with
# --no-loadscope-reorder), and a long file handed out last leaves the other worker idle
# while it runs. Others follow by name.
LONGEST_FIRST = (
    "test_end_to_end.py",
    "test_sweep.py",
    "test_any_model.py",
    "test_pipeline.py",
    "test_goodnet.py",
    "test_neural_cleanse.py",
    "test_leaderboard.py",
    "test_agnostic.py",
    "test_demo.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (see LONGEST_FIRST); tests within a file keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# The `slow` marker's bound: a test over this many seconds on 2 cores (AVX2, one TensorFlow
# thread per op), its fixtures' setup included, is marked slow; the fast subset is the rest.
# Work a process does once, for whichever test needs it first (the shared session fixtures
# below: the demo build, its data; MLflow's empty store), is timed by `once_per_process` and
# not counted against that test.
SLOW_SECONDS = 3.0
_once = {"seconds": 0.0, "depth": 0}  # once-per-process work in the test phase now running
_unmarked_seconds: dict[str, float] = {}


@contextlib.contextmanager
def once_per_process():
    """Time work this process does once, for the test that needs it first (work nested in
    such work is counted once). A context manager, or a decorator of a session fixture."""
    start = time.perf_counter()
    _once["depth"] += 1
    try:
        yield
    finally:
        _once["depth"] -= 1
        if not _once["depth"]:
            _once["seconds"] += time.perf_counter() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Hand the phase's once-per-process seconds to the controller with its report."""
    report = (yield).get_result()
    if _once["seconds"]:
        report.user_properties.append(("once_per_process_s", _once["seconds"]))
        _once["seconds"] = 0.0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Time each unmarked test, setup, call and teardown together, less once-per-process
    work (`-n 2` hands the workers' reports to the controller, which runs this)."""
    if "slow" not in report.keywords:
        once = sum(s for key, s in report.user_properties if key == "once_per_process_s")
        took = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration - once
        _unmarked_seconds[report.nodeid] = took


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the unmarked tests that took over SLOW_SECONDS, so the marker stays true."""
    over = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > SLOW_SECONDS), reverse=True)
    if over:
        terminalreporter.write_sep(
            "-", f"{len(over)} tests not marked slow took over {SLOW_SECONDS:g} s"
        )
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")


# What a run may leave in the checkout: nothing, when tests run (every location under tmp).
LEAKS = ("mlruns", "outputs", "multirun")


def _files_under(root: Path) -> set[Path]:
    return {p for name in LEAKS for p in (root / name).rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_to_the_checkout():
    """At the end of the session, no test has written an MLflow store, a run folder or a
    sweep folder into the checkout (files there before the session are left alone)."""
    before = _files_under(Path(ROOT))
    yield
    new = sorted(str(p.relative_to(ROOT)) for p in _files_under(Path(ROOT)) - before)
    assert not new, f"tests wrote into the checkout {ROOT}: {', '.join(new[:10])}"


@pytest.fixture(autouse=True)
def own_mlflow_store(tmp_path_factory, monkeypatch):
    """A fresh SQLite MLflow store per test (created on first use), no experiment chosen,
    and the working directory a temporary folder, where MLflow puts the artifacts of a run
    started without an experiment (its default artifact root is ./mlruns); no run left
    active after it."""
    tmp = tmp_path_factory.mktemp("mlflow")
    monkeypatch.chdir(tmp)
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    # no experiment chosen by an earlier test's mlflow.set_experiment (in another store)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    yield
    # a run left active (MLflow's fluent logging starts one where none is) would make the
    # worker's next run fail in another test, far from the cause: end it and say so here
    leaked = mlflow.active_run()
    if leaked is not None:
        mlflow.end_run()
        pytest.fail(f"the test left MLflow run {leaked.info.run_id} active")


@pytest.fixture(autouse=True)
def no_cached_badnet():
    """Every test starts with no BadNet cached in this process (sweep points share one),
    so that no result depends on which tests ran before it."""
    inputs._baseline.clear()


@pytest.fixture(scope="session")
@once_per_process()
def demo_dir(tmp_path_factory):
    """A fresh build per session; BADNET_REPAIR_TEST_DATA=DIR keeps one in DIR/demo across
    sessions while developing (the build is seeded, so it is the same demo)."""
    parent = os.environ.get("BADNET_REPAIR_TEST_DATA")
    if parent:
        folder = Path(parent)
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' common temporary folder
        folder = tmp_path_factory.getbasetemp().parent / "data"
    else:
        folder = tmp_path_factory.mktemp("data")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # one worker builds, the other waits for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        return demo.ensure(folder / "demo", "demo")


@pytest.fixture(scope="session")
@once_per_process()
def demo_model(demo_dir):
    return models.load_model(demo_dir / demo.MODEL_FILE)


@pytest.fixture(scope="session")
@once_per_process()
def demo_data(demo_dir):
    """(validation, test, poisoned) of the demo, as the pipeline loads them."""
    recipe = zoo.RECIPES["demo"]
    files = [*demo.CLEAN_FILES.values(), demo.poisoned_file("patch")]
    names = ("clean_validation", "clean_test", "poisoned_test")
    return tuple(
        data.load_h5(demo_dir / file, recipe.image_shape, recipe.num_classes, 1 / 255, name)
        for file, name in zip(files, names, strict=True)
    )


# Images per class in the small data (the demo's validation file has 30, its test file 40).
SMALL_PER_CLASS = {"clean_validation": 10, "clean_test": 5}


class SmallEvaluation(NamedTuple):
    files: dict[str, Path]  # clean_validation, clean_test, patch
    test: data.Dataset
    poisoned: data.Dataset


def _first_per_class(file: Path, shape, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` images of every class of an HDF5 file, and their labels."""
    x, y = data.read_h5(file, shape)
    rows = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(max(y) + 1)])
    return x[rows], y[rows]


@pytest.fixture(scope="session")
@once_per_process()
def small_evaluation(tmp_path_factory, demo_dir) -> SmallEvaluation:
    """The demo's files cut to a third (validation) and an eighth (clean test and
    poisoned): the first SMALL_PER_CLASS images of every class, and the test images of the
    other classes than the target triggered, as the build makes its poisoned file. As files,
    and the evaluation sets as the pipeline loads them: end-to-end runs that check
    machinery, not quality, score 395 images in place of 3,160 (`small_scoring`), and some
    repair on 400 validation images in place of 1,200 (`small_data`)."""
    folder = tmp_path_factory.mktemp("small_evaluation")
    recipe = zoo.RECIPES["demo"]
    (trigger,) = recipe.triggers
    files = {name: folder / f"{name}.h5" for name in ("clean_validation", "clean_test", "patch")}
    kept = {
        name: _first_per_class(demo_dir / file, recipe.image_shape, SMALL_PER_CLASS[name])
        for name, file in demo.CLEAN_FILES.items()
    }
    for name, (x, y) in kept.items():
        data.save_h5(files[name], x.transpose(0, 3, 1, 2), y)
    x, y = kept["clean_test"]
    triggered = trigger.stamp(x[y != trigger.target])
    target = np.full(len(triggered), trigger.target)
    data.save_h5(files["patch"], triggered.transpose(0, 3, 1, 2), target)
    return SmallEvaluation(
        files,
        data.load_h5(
            files["clean_test"], recipe.image_shape, recipe.num_classes, 1 / 255, "clean_test"
        ),
        data.load_h5(
            files["patch"], recipe.image_shape, recipe.num_classes, 1 / 255, "poisoned_test"
        ),
    )


def evaluation_overrides(files: dict[str, Path]) -> list[str]:
    """Overrides that score a demo run on these clean test and poisoned files."""
    return [f"data.clean_test={files['clean_test']}", f"data.poisoned.patch={files['patch']}"]


@pytest.fixture(scope="session")
def small_scoring(small_evaluation) -> list[str]:
    """Overrides for runs that check machinery, not quality: scored on the small set."""
    return evaluation_overrides(small_evaluation.files)


@pytest.fixture(scope="session")
def small_data(small_evaluation, small_scoring) -> list[str]:
    """`small_scoring`, and repaired on the small validation file (40 held-out images):
    for runs whose repair is fixed (a sparsity, epochs), stopped before its choice
    matters, or run to check the contract, not what a budget chooses (on 40 held-out
    images a budgeted repair may choose otherwise than on 120)."""
    return [f"data.clean_validation={small_evaluation.files['clean_validation']}", *small_scoring]


def tiny_default(overrides, keep_default: bool = False) -> list[str]:
    """`overrides`, and for tests of the pipeline's machinery: where they choose no repair
    (no `repair=`, `ft_sam.` or `+experiment=`), `repair=fine_pruning`, the default
    chain's first step, and where they choose no detector, the default GoodNet's first,
    `disagreement` (each detector end to end is test_end_to_end's); or with
    `keep_default` the default chain and GoodNet themselves, the chain's FT-SAM step at
    tiny settings (the default's own settings are measured, not tested)."""
    overrides = list(overrides)
    repair_chosen = any(o.startswith(("repair=", "ft_sam.", "+experiment=")) for o in overrides)
    if keep_default:
        return overrides if repair_chosen else [*TINY["ft_sam"], *overrides]
    detector_chosen = any(o.startswith("goodnet.detector=") for o in overrides)
    return [
        *([] if repair_chosen else ["repair=fine_pruning"]),
        *([] if detector_chosen else ["goodnet.detector=disagreement"]),
        *overrides,
    ]


@functools.cache
def _empty_store() -> Path:
    """An empty SQLite MLflow store, made by MLflow once per process: a copy of it is a
    new store without MLflow's schema migrations (2 s on an AVX-512 machine, 3 s or more
    on an AVX2 one)."""
    folder = Path(tempfile.mkdtemp(prefix="empty-mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with once_per_process():
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def compose_config(
    tmp_path, demo_dir, *overrides: str, keep_default: bool = False, new_store: bool = True
):
    """The run's config as Hydra composes it and `pipeline.run` settles it (a chain's
    steps in `repair`), with every location under `tmp_path` (see `tiny_default`); with
    `new_store` its SQLite store, if absent, starts as a copy of an empty one."""
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"paths.root={tmp_path}",
                f"paths.data={demo_dir.parent}",
                f"paths.output_dir={tmp_path}/out",
                *tiny_default(overrides, keep_default),
            ],
        )
    config.settle(cfg)
    db = tracking.sqlite_path(cfg.tracking.uri)
    if new_store and db is not None and db.is_absolute() and not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)
    return cfg


def run_afresh(folder: Path, demo_dir: Path, *overrides: str):
    """`pipeline.run` of `compose_config`'s config from nothing cached (the BadNet, its
    data and every shared value loaded or computed afresh): the config and metrics."""
    inputs._baseline.clear()
    cfg = compose_config(folder, demo_dir, *overrides)
    return cfg, pipeline.run(cfg)


def plain(path: Path) -> keras.Model:
    """A saved net, loaded by tf_keras itself."""
    return keras.models.load_model(path, compile=False)


def assert_same_weights(first: Path, second: Path) -> None:
    """Two saved nets hold bit-identical weights, of the same names."""
    a, b = plain(first), plain(second)
    assert [w.name for w in a.weights] == [w.name for w in b.weights]
    differ = [w.name for w, v in zip(a.weights, b.weights, strict=True) if not np.array_equal(w, v)]
    assert not differ, f"{first.name}: weights differ with other evaluation files: {differ}"


def run_py_command(root: Path, data: Path | None, *args: str) -> list[str]:
    """`python run.py ARGS` with every location under `root` and the demo BadNets read from
    (or built into) the folder `data` (paths.data: `demo_dir.parent` for the session's
    demo); flags (`-m`) go first."""
    flags = [a for a in args if a.startswith("-")]
    overrides = tiny_default(a for a in args if not a.startswith("-"))
    where = [f"paths.root={root}"] + ([f"paths.data={data}"] if data else [])
    return [sys.executable, f"{ROOT}/run.py", *flags, *where, *overrides]


def run_py(root: Path, data: Path | None, *args: str, timeout: int = 600):
    """Run `run.py` (see `run_py_command`) from `root` and return the finished process."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        run_py_command(root, data, *args),
        capture_output=True,
        text=True,
        cwd=root,
        timeout=timeout,
    )


def multirun(root: Path, data: Path | None, *args: str, timeout: int = 900) -> str:
    """A sweep, `run.py -m ARGS`, that must succeed; its output (stdout and stderr)."""
    done = run_py(root, data, "-m", *args, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr
