"""Bad input: one clear line naming the key or file, before heavy work, no run left RUNNING."""

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import tf_keras as keras
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badnet_repair import UserError, data
from badnet_repair.experiment import inputs, pipeline
from badnet_repair.network import models

from conftest import compose_config, run_py_command


def h5_file(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


def demo_images(n=8, layout="channels_first"):
    x = np.random.default_rng(0).uniform(0, 255, (n, 55, 47, 3)).astype(np.float32)
    return x.transpose(0, 3, 1, 2) if layout == "channels_first" else x


def model_with_layer_class(path, class_name):
    """A small model file whose stored config names an arbitrary layer class."""
    inp = keras.Input((55, 47, 3))
    out = keras.layers.Dense(40, activation="softmax", name="head")(
        keras.layers.Flatten(name="flatten")(inp)
    )
    models.save_model(keras.Model(inp, out), path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"]["layers"][1]["class_name"] = class_name
        f.attrs["model_config"] = json.dumps(config)
    return path


# (case, what to write into tmp/bad.h5 or None, overrides, expected message)
CASES = [
    (
        "model file missing",
        None,
        ["model.file={tmp}/absent.h5"],
        "missing input files: {tmp}/absent.h5",
    ),
    ("model file not HDF5", "text", ["model.file={bad}"], "not a Keras .h5 or .keras model file"),
    ("HDF5 but no model", "h5", ["model.file={bad}"], "holds weights only: set model.architecture"),
    (
        "Lambda layer",
        "lambda",
        ["model.file={bad}"],
        "layer 'flatten' is a Lambda.*model.allow_unsafe=true",
    ),
    (
        "custom layer",
        "custom",
        ["model.file={bad}"],
        "unknown class 'EvilLayer'.*model.allow_unsafe",
    ),
    (
        "unknown architecture",
        None,
        ["model.architecture=vgg"],
        "model.architecture=.vgg.: expected one of deepid",
    ),
    ("data without label", "nolabel", ["data.clean_test={bad}"], "dataset named 'label'"),
    ("data shape", "shape", ["data.clean_test={bad}"], r"images of shape \(3, 50, 47\)"),
    (
        "labels out of range",
        "range",
        ["data.clean_test={bad}"],
        r"labels span \[33, 40\], expected \[0, 40\)",
    ),
    (
        "labels not integers",
        "fraction",
        ["data.clean_validation={bad}"],
        "labels must be whole numbers",
    ),
    ("empty data set", "empty", ["+data.poisoned.x={bad}"], "holds no images"),
    ("NaN pixels", "nan", ["data.clean_test={bad}"], "NaN or infinite pixels"),
    (
        "pixels already in 0..1",
        "unit",
        ["data.clean_test={bad}"],
        r"pixels already span 0\.\.0\.9\d*, and data.scale=0.00392157 would scale them "
        "again: set data.scale=1",
    ),
    (
        "validation is the test set",
        None,
        ["data.clean_test={demo}/clean_validation_data.h5"],
        "config keys data.clean_validation=.* and data.clean_test=.*: the same data",
    ),
    (
        "output layer pruned",
        None,
        ["model.layer=output"],
        "model.layer='output': the output layer cannot be pruned",
    ),
    ("negative epochs", None, ["finetune.epochs=-1"], "finetune.epochs=-1: expected >= 0"),
    ("unknown repair", None, ["repair=oracle"], "compose"),
    (
        "unknown detector",
        None,
        ["goodnet.detector=oracle"],
        "config key goodnet.detector='oracle': expected one of "
        "badexpert, disagreement, scale_up, strip, teco, both, or a list of them",
    ),
    ("frr out of range", None, ["goodnet.frr=1.5"], r"goodnet.frr=1.5: expected in \(0, 1\)"),
    ("layer missing", None, ["model.layer=conv_9"], "model.layer='conv_9': no such layer"),
    ("layer not prunable", None, ["model.layer=pool_3"], "model.layer='pool_3': a MaxPooling2D"),
    (
        "tracking unreachable",
        None,
        ["tracking.uri=http://127.0.0.1:9"],
        "tracking.uri=http://127.0.0.1:9: MLflow store not reachable",
    ),
    (
        "output not writable",
        None,
        ["paths.output_dir=/proc/badnet"],
        "paths.output_dir=/proc/badnet: cannot write",
    ),
]


def write_bad(kind, path):
    writers = {
        "text": lambda: path.write_text("just text"),
        "h5": lambda: h5_file(path, something=np.zeros(3)),
        "lambda": lambda: model_with_layer_class(path, "Lambda"),
        "custom": lambda: model_with_layer_class(path, "EvilLayer"),
        "nolabel": lambda: h5_file(path, data=demo_images()),
        "shape": lambda: h5_file(path, data=demo_images()[:, :, :50], label=np.zeros(8)),
        "range": lambda: h5_file(path, data=demo_images(), label=np.arange(33, 41)),
        "fraction": lambda: h5_file(path, data=demo_images(), label=np.full(8, 0.5)),
        "empty": lambda: h5_file(path, data=demo_images()[:0], label=np.zeros(0)),
        "nan": lambda: h5_file(path, data=np.full((8, 3, 55, 47), np.nan), label=np.zeros(8)),
        "unit": lambda: h5_file(path, data=demo_images() / 255.0, label=np.zeros(8)),
    }
    writers[kind]()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for every case (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.mark.parametrize(("case", "bad", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(
    tmp_path, demo_dir, store, monkeypatch, case, bad, overrides, expected
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    bad_path = tmp_path / "bad.h5"
    if bad:
        write_bad(bad, bad_path)
    demo = [
        "model=custom",
        f"model.file={demo_dir}/bd_net.h5",
        "model.layer=conv_3",
        f"data.clean_validation={demo_dir}/clean_validation_data.h5",
        f"data.clean_test={demo_dir}/clean_test_data.h5",
        f"+data.poisoned.patch={demo_dir}/patch_poisoned_data.h5",
        "finetune.epochs=1",
        f"tracking.uri={store}",
    ]
    given_overrides = [o.format(tmp=tmp_path, bad=bad_path, demo=demo_dir) for o in overrides]
    if expected == "compose":
        with pytest.raises(ConfigCompositionException):
            compose_config(tmp_path, demo_dir, *demo, *given_overrides)
        return
    cfg = compose_config(tmp_path, demo_dir, *demo, *given_overrides)
    start = time.perf_counter()
    with pytest.raises(UserError, match=expected.format(tmp=tmp_path)) as err:
        pipeline.run(cfg)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 30  # before any training
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert not [run.info.run_name for run in runs if run.info.status == "RUNNING"]


def test_a_missing_data_path_for_the_demo_is_one_line_before_any_work(tmp_path, demo_dir):
    """The demo's files are built on first use; a data path the build does not make must
    exist already, and is checked before the build and before any run starts."""
    absent = f"data.clean_test={tmp_path}/absent.h5"
    cfg = compose_config(tmp_path, demo_dir, absent, new_store=False)
    with pytest.raises(UserError, match=f"^missing input files: {tmp_path}/absent.h5$"):
        pipeline.run(cfg)
    assert not (tmp_path / "mlruns").exists()


def test_poisoned_set_with_several_targets_warns_with_counts(tmp_path, caplog, demo_dir):
    path = h5_file(
        tmp_path / "mixed.h5", data=demo_images(), label=np.array([1, 1, 1, 1, 1, 2, 2, 3])
    )
    cfg = compose_config(tmp_path, demo_dir, f"+data.poisoned.mixed={path}")
    inputs.load_inputs(cfg)
    assert "poisoned set mixed has 3 targets (label: images) 1: 5, 2: 2, 3: 1" in caplog.text


@pytest.mark.slow
def test_sigterm_during_finetuning_ends_the_run_killed(tmp_path, demo_dir, small_data):
    proc = subprocess.Popen(
        run_py_command(tmp_path, demo_dir.parent, *small_data, "finetune.epochs=500"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 2/500" in line:
            break
    proc.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    rest, _ = proc.communicate(timeout=90)  # drained, so a full pipe cannot stall it
    # the 498 epochs left take minutes; ending the run (MLflow, TensorFlow's teardown)
    # takes seconds, 23 on a 2-core machine busy with two other jobs
    assert time.perf_counter() - sent < 45
    assert proc.returncode == 130, "".join(lines[-20:]) + rest[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    assert run.info.status == "KILLED"
    assert "badnet/clean_acc" in run.data.metrics and "finetune/loss" in run.data.metrics
    assert not list((tmp_path / "outputs").glob("*/*/repaired_net.h5"))


DTYPES = st.sampled_from(["f4", "f8", "f2", "i1", "u1", "i8", "?", "c8", "S3"])
SHAPES = st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple)


@st.composite
def h5_structures(draw):
    names = draw(st.lists(st.sampled_from(["data", "label", "extra"]), unique=True, max_size=3))
    group = draw(st.sampled_from([None, "data", "label"]))
    shapes = {name: draw(SHAPES) for name in names}
    if draw(st.booleans()) and "data" in names:
        shapes["data"] = (draw(st.integers(0, 3)), 3, 55, 47)
        shapes["label"] = (shapes["data"][0],)
        names = sorted({*names, "label"})
    return [
        (n, shapes[n], draw(DTYPES), draw(st.sampled_from([0, 1, 7, 40, np.nan, 1e9])))
        for n in names
        if n != group
    ], group


def filled(shape, dtype, fill):
    if dtype == "S3":
        return np.full(shape, b"ab", dtype="S3")
    if dtype[0] in "iu?" and not np.isfinite(fill):
        return np.zeros(shape, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.full(shape, fill).astype(dtype)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h5_structures())
def test_fuzzed_data_files_give_only_clear_errors(structure):
    datasets, group = structure
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.h5"
        with h5py.File(path, "w") as f:
            if group:
                f.create_group(group)
            for name, shape, dtype, fill in datasets:
                f.create_dataset(name, data=filled(shape, dtype, fill))
        try:
            ds = data.load_h5(path, (55, 47, 3), 40, 1 / 255, "fuzz")
        except UserError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert ds.x.shape[1:] == (55, 47, 3) and len(ds) > 0
            assert ds.y.min() >= 0 and ds.y.max() < 40 and np.isfinite(ds.x).all()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["class_name", "config", "layers", "name", "layer"]),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_fuzzed_model_configs_give_only_clear_errors(config):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.h5"
        with h5py.File(path, "w") as f:
            f.attrs["model_config"] = json.dumps(config)
        with pytest.raises(UserError) as err:
            models.load_model(path)
        assert str(path) in str(err.value)
