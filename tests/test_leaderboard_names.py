"""The leaderboard tells nets apart: BadNets brought with `model=custom` are named by
their file, and two different files of one name by their content hash."""

import mlflow

from badnet_repair.experiment import leaderboard


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
