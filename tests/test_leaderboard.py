"""The leaderboard: a sweep over repairs on every BadNet of the zoo (`+experiment=zoo`, two
repairs here; every repair end to end is test_end_to_end's), resumable like every sweep,
rebuilt from the store; the clean rule that marks the best repair reads no test or
poisoned data."""

from pathlib import Path

import mlflow
import pytest

from badnet_repair import UserError
from badnet_repair.defenses import repairs
from badnet_repair.experiment import config, leaderboard
from badnet_repair.zoo import recipes as zoo

from conftest import TINY, multirun

# Tiny demo builds, the mechanics, not the figures: 40 to 80 validation images, a quarter
# held out (at least 10, which the repairs need to choose on).
TINY_BUILDS = ["model.build_scale=0.05", "data.holdout=0.25"]
REPAIRS = ("fine_pruning",)  # one point per BadNet: the mechanics, not a comparison


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """`+experiment=zoo` over one repair, run twice: the second finds every point done.
    The leaderboard's probe scans at Neural Cleanse's tiny settings (forced in with ++)."""
    root = tmp_path_factory.mktemp("zoo")
    probe = [f"++{o}" for o in TINY["neural_cleanse"] if not o.startswith("finetune.")]
    args = ["+experiment=zoo", f"repair={','.join(REPAIRS)}", *TINY_BUILDS, "goodnet.k=8"]
    args += ["finetune.epochs=1", *probe]
    first = multirun(root, root / "data", *args)
    again = multirun(root, root / "data", *args)
    return root, first, again


def parent_of(root: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    return parent


@pytest.mark.slow
def test_zoo_runs_every_demo_badnet_in_one_experiment_and_resumes(swept):
    root, first, again = swept
    parent = parent_of(root, "zoo")
    rows = leaderboard.runs(["zoo"], parent.info.run_id)
    assert {(r["badnet"], r["repair"]) for r in rows} == {
        (badnet, repair) for badnet in zoo.ZOO_NAMES for repair in REPAIRS
    }
    assert again.count("already FINISHED") == len(rows)
    assert "Leaderboard:" in first and "| badnet | repair | best |" in first
    assert "asr/glasses" in first and "asr/blend" in first  # every trigger has its column
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.png", "summary.md"} <= artifacts


@pytest.mark.slow
def test_the_leaderboard_is_rebuilt_from_the_store(swept, tmp_path, capsys):
    root, *_ = swept
    parent = parent_of(root, "zoo")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    argv = ["--tracking-uri", uri, "--parent", parent.info.run_id, "--out", str(tmp_path)]
    assert leaderboard.main(argv) == 0
    logged = mlflow.MlflowClient().download_artifacts(parent.info.run_id, "leaderboard.md")
    assert capsys.readouterr().out == Path(logged).read_text()
    assert (tmp_path / "leaderboard.png").stat().st_size > 0
    assert leaderboard.main(["--tracking-uri", uri, "--experiment", "absent"]) == 1


@pytest.mark.parametrize("experiment", ["defense_comparison", "zoo"])
def test_the_comparisons_sweep_every_repair(experiment):
    """`+experiment=defense_comparison` and `zoo` sweep over every repair, whatever repairs
    there are: a key of one repair's section is refused, naming every other repair."""
    with pytest.raises(UserError) as err:
        config.check_overrides([f"+experiment={experiment}", "prune.sparsity=0.5"])
    others = [name for name in repairs.names() if "prune" not in repairs.sections(name)]
    assert f"not read by repair={','.join(others)} (read by" in str(err.value)


def finished_run(client, experiment_id: str, badnet: str, repair: str, **metrics) -> None:
    run = client.create_run(experiment_id, tags={"config_hash": f"{badnet}-{repair}"})
    client.log_param(run.info.run_id, "model.name", badnet)
    client.log_param(run.info.run_id, "repair", repair)
    values = {"badnet/clean_acc": 0.97, "badnet/asr/patch": 1.0, "badnet/holdout_acc": 0.96}
    for key, value in {**values, **metrics}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")


@pytest.mark.slow
def test_the_clean_rule_never_reads_the_test_or_poisoned_sets(tmp_path):
    """The best repair is marked by held-out accuracy and the probe: a repair with a
    perfect (test) ASR but a worse probe is not picked; one over the accuracy budget is
    not picked; a BadNet without a probe gets no mark."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("board")
    common = {"repaired/clean_acc": 0.96}
    finished_run(
        client,
        experiment,
        "a",
        "x",
        **common,
        **{"repaired/asr/patch": 0.0},
        **{"repaired/holdout_acc": 0.955, "repaired/probe_asr": 0.3},
    )
    finished_run(
        client,
        experiment,
        "a",
        "y",
        **common,
        **{"repaired/asr/patch": 0.5},
        **{"repaired/holdout_acc": 0.95, "repaired/probe_asr": 0.01},
    )
    finished_run(
        client,
        experiment,
        "a",
        "z",
        **common,
        **{"repaired/asr/patch": 0.4},
        **{"repaired/holdout_acc": 0.90, "repaired/probe_asr": 0.0},
    )
    finished_run(
        client,
        experiment,
        "b",
        "x",
        **common,
        **{"repaired/asr/patch": 0.0},
        **{"repaired/holdout_acc": 0.96},
    )
    rows = leaderboard.runs(["board"])
    marks = leaderboard.best(rows)
    picked = {
        row["badnet"]: row["repair"] for row in rows if marks.get(row["badnet"]) == row["run_id"]
    }
    assert picked == {"a": "y"}
    text = leaderboard.markdown(rows)
    assert (
        "| a | y | * |" in text
        and "goal (ASR <= 0.02 at <= 2 points lost) reached on: a, b" in text
    )


@pytest.mark.slow
def test_the_goodnets_detectors_have_a_table_of_their_own(tmp_path):
    """Per run, each detector's figures and then the GoodNet's rule (`together`), which
    has no AUROC of its own and alone a p against its promise; runs without detector
    figures add no rows, and a board of them no table."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("board")
    repaired = {"repaired/clean_acc": 0.96, "repaired/asr/patch": 0.0}
    badexpert = {"flag_rate_clean": 0.04, "detect/patch": 0.9, "auroc/patch": 0.99}
    points = {"detect_at_frr_0.01/patch": 0.7, "detect_at_frr_0.05/patch": 0.95}
    goodnet = {"flag_rate_clean": 0.05, "detect/patch": 0.92, **points}
    figures = {f"goodnet/badexpert/{k}": v for k, v in {**badexpert, **points}.items()}
    figures.update({f"goodnet/{k}": v + 0.02 for k, v in goodnet.items()})
    figures["goodnet/frr_p"] = 2.5e-6  # shown to two digits, not as 0.0000
    finished_run(client, experiment, "a", "x", **repaired, **figures)
    finished_run(client, experiment, "b", "x", **repaired)
    rows = leaderboard.runs(["board"])
    columns, cells = leaderboard.detector_table(rows)
    assert columns == [
        "badnet",
        "repair",
        "detector",
        "frr",
        "frr_p",
        "detect/patch",
        "auroc/patch",
        "at_1%/patch",
        "at_5%/patch",
    ]
    assert cells == [
        ["a", "x", "badexpert", "0.0400", "", "0.9000", "0.9900", "0.7000", "0.9500"],
        ["a", "x", "together", "0.0700", "2.5e-06", "0.9400", "", "0.7200", "0.9700"],
    ]
    assert "GoodNet detectors:" in leaderboard.markdown(rows)
    assert "GoodNet detectors:" not in leaderboard.markdown(rows[1:])
