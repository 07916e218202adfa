"""The leaderboard tells nets apart: BadNets brought with `model=custom` are named by
their file, and two different files of one name by their content hash: from runs logged
directly, and from real pipeline runs."""

import mlflow
import pytest

from badnet_repair import files
from badnet_repair.experiment import leaderboard, pipeline
from badnet_repair.network import models

from conftest import compose_config


@pytest.mark.slow
def test_custom_nets_are_named_by_file_and_told_apart_by_content(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("custom")
    nets = [
        ("custom", "/nets/a/bd_net.h5", "aaaaaaaa11"),
        ("custom", "/nets/b/bd_net.h5", "bbbbbbbb22"),
        ("custom", "/nets/sunglasses_bd_net.h5", "cccccccc33"),
        ("demo", "/data/demo/bd_net.h5", "dddddddd44"),
    ]
    for i, (name, file, digest) in enumerate(nets):
        with mlflow.start_run(tags={"config_hash": str(i), "model.content_hash": digest}):
            mlflow.log_params({"model.name": name, "model.file": file, "repair": "finetune"})
            mlflow.log_metrics({"badnet/clean_acc": 0.9, "repaired/clean_acc": 0.9})
    names = sorted(row["badnet"] for row in leaderboard.runs(["custom"]))
    assert names == ["bd_net@aaaaaaaa", "bd_net@bbbbbbbb", "demo", "sunglasses_bd_net"]


@pytest.mark.slow
def test_real_runs_of_two_custom_files_of_one_name_are_two_rows(
    tmp_path, demo_dir, small_evaluation
):
    """Two pipeline runs of `model=custom` on two different files both named bd_net.h5
    (the demo's weights, and the same with one bias moved): the leaderboard rebuilt from
    their store names each by its file and its content hash."""
    nets = []
    for folder, shift in (("a", 0.0), ("b", 0.5)):
        model = models.load_model(demo_dir / "bd_net.h5")
        layer = model.get_layer("conv_3")
        layer.bias.assign(layer.bias + shift)
        nets.append(models.save_model(model, tmp_path / folder / "bd_net.h5"))
    small = small_evaluation.files  # the machinery, not the figures
    for net in nets:
        line = ["model=custom", f"model.file={net}", "repair=finetune", "finetune.epochs=0"]
        line += [f"data.{key}={small[key]}" for key in ("clean_validation", "clean_test")]
        line.append(f"+data.poisoned.patch={small['patch']}")
        pipeline.run(compose_config(tmp_path, demo_dir, *line))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    names = sorted(row["badnet"] for row in leaderboard.runs(["custom"]))
    assert names == sorted(f"bd_net@{files.content_hash(net)[:8]}" for net in nets)
