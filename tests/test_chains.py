"""Chains: `repair=[a,b]`, one config line, runs repairs in turn, each from the previous
one's net. How the line composes and what it refuses; the steps on a small net of
test_agnostic (each from the previous net, budgets from the BadNet); and a chain end to
end on the demo through a SQLite MLflow store."""

import json

import mlflow
import numpy as np
import pytest

# the fixtures net, store and case are test_agnostic's: test parameters named after them
# are those fixtures, not redefinitions
# ruff: noqa: F811
from test_agnostic import case, net, store  # noqa: F401

from badnet_repair import UserError
from badnet_repair.defenses import repairs
from badnet_repair.defenses.budget import NoneWithinBudget
from badnet_repair.experiment import config, leaderboard, pipeline, sweep
from badnet_repair.network import models, pruning
from badnet_repair.network.predict import accuracy

from conftest import TINY, compose_config


def composed(tmp_path, *overrides: str):
    """The settled config, its data folder named but not built (composition reads no file)."""
    return compose_config(tmp_path, tmp_path / "data" / "demo", *overrides, keep_default=True)


@pytest.mark.parametrize("order", [["fine_pruning", "ft_sam"], ["ft_sam", "fine_pruning"]])
def test_a_list_selection_chains_the_repairs_in_the_order_given(tmp_path, order):
    cfg = composed(tmp_path, f"repair=[{','.join(order)}]")
    config.validate(cfg)
    assert list(cfg.repair) == order and "chain" not in cfg
    own = set(cfg) - set(config.PIPELINE_SECTIONS) - set(config.ROOT_KEYS) - {"repair"}
    assert own == {"prune", "finetune", "ft_sam"}  # both steps' sections, each typed
    assert cfg.prune.max_acc_drop == 0.04 and cfg.ft_sam.steps == 600
    assert repairs.label(cfg) == "+".join(order)
    described = repairs.describe(cfg)
    assert described.index(f"{order[0]} (") < described.index(f") + {order[1]} (")


@pytest.mark.slow
def test_every_repair_composes_as_a_step(tmp_path):
    """Each repair's file loads its schema by path (`- /schema/repair/NAME`), not as a
    choice of a `schema/repair` group, which a chain would choose twice."""
    for name in repairs.names():
        partner = "sau" if name != "sau" else "finetune"
        assert list(composed(tmp_path, f"repair=[{name},{partner}]").repair) == [name, partner]


def test_single_repairs_and_their_keys_mean_what_they_meant(tmp_path):
    assert list(composed(tmp_path).repair) == ["fine_pruning", "ft_sam"]
    single = composed(tmp_path, "repair=ft_sam")
    assert single.repair == "ft_sam" and "chain" not in single
    assert sweep.config_hash(single) == sweep.config_hash(composed(tmp_path, "repair=[ft_sam]"))
    config.check_overrides(["model=sunglasses", "prune.sparsity=0.5"])  # read: no error
    cfg = composed(tmp_path, "model=sunglasses", "prune.sparsity=0.5")
    assert (cfg.model.name, cfg.prune.sparsity) == ("sunglasses", 0.5)
    assert repairs.describe(cfg).startswith("fine_pruning (sparsity 0.5, 5 epochs) + ft_sam (")


@pytest.mark.parametrize(
    ("line", "chain", "says"),
    [
        ("repair=[fine_pruning,nope]", "fine_pruning,nope", "no repair nope; expected names"),
        ("repair=[ft_sam,ft_sam]", "ft_sam,ft_sam", "ft_sam more than once"),
        ("repair=[fine_pruning,magnitude]", "fine_pruning,magnitude", "different keys under prune"),
        ("repair=[finetune,ft_sam],[sau,nope]", "sau,nope", "no repair nope"),  # a sweep
    ],
)
def test_a_chain_of_unknown_repeated_or_clashing_steps_is_one_line(line, chain, says):
    with pytest.raises(UserError) as err:
        config.check_overrides([line])
    assert str(err.value).startswith(f"config key repair=[{chain}]: ")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_validate_refuses_a_chain_set_otherwise(tmp_path):
    cfg = composed(tmp_path, "repair=[finetune,ft_sam]")
    cfg.repair = ["finetune", "finetune"]
    with pytest.raises(UserError, match=r"config key repair=\[finetune,finetune\]: finetune"):
        config.validate(cfg)


def test_a_key_is_refused_only_where_no_step_of_a_run_reads_it():
    config.check_overrides(["repair=[fine_pruning,ft_sam]", "prune.sparsity=0.5"])
    with pytest.raises(UserError, match=r"prune.sparsity: not read by repair=finetune\+ft_sam "):
        config.check_overrides(["repair=[finetune,ft_sam]", "prune.sparsity=0.5"])
    with pytest.raises(UserError, match=r"prune.sparsity: not read by repair=finetune \(read"):
        config.check_overrides(["repair=[fine_pruning,ft_sam],finetune", "prune.sparsity=0.5"])


@pytest.mark.slow
def test_each_step_repairs_the_previous_ones_net_under_its_own_names(case, tmp_path):
    """Magnitude pruning then fine-tuning, both for 0 epochs (the steps share `finetune`):
    the second step's net is the first one's output, half its weights zero, and is the
    repaired net."""
    line = ["repair=[magnitude,finetune]", "prune.sparsity=0.5", "finetune.epochs=0"]
    steps, repaired = repairs.run(composed(tmp_path, *line), case)
    assert [step.journal.prefix for step in steps] == ["magnitude/", "finetune/"]
    assert steps[0].badnet is case.badnet and steps[1].original is case.badnet
    assert steps[1].memo is not case.memo  # the memo's caches are the BadNet's
    kernel = steps[1].badnet.get_layer("conv_b").kernel.numpy()
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.05)
    assert not np.any(case.badnet.get_layer("conv_b").kernel.numpy() == 0)
    for mine, theirs in zip(repaired.get_weights(), steps[1].badnet.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert [item.name for item in steps[0].handed] == ["magnitude/pruned", "magnitude/repaired"]
    assert steps[1].handed == []
    assert case.journal.metrics["magnitude/prune/sparsity"] == pytest.approx(0.5, abs=0.05)
    held = accuracy(case.badnet, case.clean.holdout, case.batch_size)
    assert steps[1].badnet_holdout_accuracy() == held == case.badnet_holdout_accuracy()


@pytest.mark.slow
def test_a_step_out_of_the_badnets_budget_declines_the_chain(case, tmp_path):
    """Fine-tuning at a wrecking rate, then FT-SAM at a rate too small to change much: its
    budget counts from the BadNet (held-out accuracy 1: the labels are the net's own), not
    from the wreck it starts from, so no rate is within it and the chain declines."""
    cfg = composed(
        tmp_path,
        "repair=[finetune,ft_sam]",
        "finetune.lr=10",
        "finetune.epochs=2",
        "ft_sam.steps=2",
        "ft_sam.batch_size=32",
        "ft_sam.lrs=[0.0001]",
        "ft_sam.max_acc_drop=0.05",
    )
    with pytest.raises(NoneWithinBudget, match=r"floor 0\.9500"):
        repairs.run(cfg, case)


@pytest.mark.slow
def test_a_chain_runs_end_to_end_each_step_scored_the_second_from_the_firsts_net(
    tmp_path, demo_dir, small_scoring
):
    """Fine-pruning (half of conv_3, no fine-tuning), then RNP: both steps' stages are
    scored and logged under their names, and the repaired net keeps the channels
    fine-pruning zeroed (RNP prunes the net it is given and trains nothing)."""
    line = ["repair=[fine_pruning,rnp]", "prune.sparsity=0.5", "finetune.epochs=0"]
    settings = [*small_scoring, *line, *TINY["rnp"]]
    metrics = pipeline.run(compose_config(tmp_path, demo_dir, *settings))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["repair"] == "fine_pruning+rnp"
    assert run.data.params["repair"] == "fine_pruning+rnp"  # in sweep tables too
    assert run.info.run_name.startswith("demo fine_pruning (sparsity 0.5, 0 epochs) + rnp (")
    stages = ["badnet", "fine_pruning/pruned", "fine_pruning/repaired", "rnp/unlearned"]
    for stage in (*stages, "repaired", "goodnet"):
        for key in ("clean_acc", "asr/patch"):
            assert run.data.metrics[f"{stage}/{key}"] == pytest.approx(metrics[f"{stage}/{key}"])
    assert metrics["fine_pruning/prune/channels_pruned"] == 30
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(run.info.run_id, "fine_pruning/curve/clean_acc")
    assert sorted(m.step for m in curve) == list(range(61))
    assert {"stages.png", "repaired_net.h5"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "fine_pruning")} == {
        "fine_pruning/curve.png"
    }
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path))
    notes = json.loads((tmp_path / "metrics.json").read_text())
    zeroed = pruning.zeroed_channels(
        models.load_model(f"{local}/repaired_net.h5").get_layer("conv_3")
    )
    assert set(notes["fine_pruning/pruned_channels"]) <= set(zeroed)
    assert "repair:\n- fine_pruning\n- rnp\n" in (tmp_path / "config.yaml").read_text()
    (row,) = leaderboard.runs(["demo"])
    assert row["repair"] == "fine_pruning+rnp"
