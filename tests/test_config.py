from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from badnet_repair import UserError
from badnet_repair.defenses import repairs
from badnet_repair.experiment import config, sweep

from conftest import ROOT, compose_config


@pytest.mark.slow
def test_every_config_choice_composes_and_validates(tmp_path, demo_dir):
    for group in ("repair", "goodnet", "tracking", "sweep", "model", "paths"):
        for choice in sorted(Path(ROOT, "conf", group).glob("*.yaml")):
            cfg = compose_config(tmp_path, demo_dir, f"{group}={choice.stem}")
            if choice.stem == "custom":
                with pytest.raises(UserError, match="model.file: required"):
                    config.validate(cfg)
                continue
            config.validate(cfg)
            assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
            if group == "model":
                assert cfg.model.name == choice.stem


@pytest.mark.slow
def test_each_repair_config_holds_exactly_the_sections_it_reads(tmp_path, demo_dir):
    """`run.py repair=NAME --cfg job` shows the pipeline's sections and the repair's own."""
    choices = sorted(p.stem for p in Path(ROOT, "conf", "repair").glob("*.yaml"))
    assert choices == repairs.names()
    for name in choices:
        cfg = compose_config(tmp_path, demo_dir, f"repair={name}")
        assert cfg.repair == name
        own = set(cfg) - set(config.PIPELINE_SECTIONS) - set(config.ROOT_KEYS) - {"repair"}
        assert own == set(repairs.sections(name))
        for section in own:  # typed by the repair's schema, every key set by its file
            assert OmegaConf.get_type(cfg[section]) is not dict
            assert not OmegaConf.missing_keys(cfg[section])


def test_default_config_is_the_demo_with_an_absolute_store(tmp_path, demo_dir):
    cfg = compose_config(tmp_path, demo_dir, keep_default=True)
    assert cfg.model.name == "demo" and cfg.model.layer == "conv_3"
    assert list(cfg.repair) == ["fine_pruning", "ft_sam"] and cfg.prune.max_acc_drop == 0.04
    assert cfg.prune.sparsity is None  # the stopping rule, unless a sparsity is given
    assert list(cfg.goodnet.detector) == ["disagreement", "badexpert"]
    assert cfg.goodnet.auxiliary.value == "auto"  # B' after the chain's FT-SAM step
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert cfg.tracking.experiment == "demo"
    assert set(cfg.data.poisoned) == {"patch"}


def test_project_root_does_not_depend_on_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert config.project_root() == ROOT


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("prune.max_acc_drop=1.0", "prune.max_acc_drop"),
        ("ft_sam.margin_se=-1", "ft_sam.margin_se"),
        ("finetune.epochs=-1", "finetune.epochs"),
        ("finetune.lr=0", "finetune.lr"),
        ("finetune.batch_size=0", "finetune.batch_size"),
        ("data.holdout=1", "data.holdout"),
        ("seed=-1", "seed"),
        ("eval_batch_size=0", "eval_batch_size"),
        ("model.builder=other", "model.builder"),
        ("goodnet.expert_lr=0", "goodnet.expert_lr"),
        ("goodnet.expert_epochs=0", "goodnet.expert_epochs"),
        ("goodnet.expert_stop_acc=1.5", "goodnet.expert_stop_acc"),
        ("goodnet.aux_epochs=0", "goodnet.aux_epochs"),
    ],
)
def test_out_of_range_values_name_their_key(tmp_path, demo_dir, override, key):
    cfg = compose_config(tmp_path, demo_dir, override)
    with pytest.raises(UserError, match=f"config key {key}="):
        config.validate(cfg)


@pytest.mark.parametrize(
    "override",
    [
        "prune.method=random",
        "finetune.epochs=three",
        "prune.sparsity=half",
        "seed=abc",
        "repair=x",
        "goodnet.auxiliary=oracle",
    ],
)
def test_wrong_types_fail_at_composition(tmp_path, demo_dir, override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(tmp_path, demo_dir, override)


def test_point_fingerprint_ignores_where_outputs_go_and_the_resume_flag(tmp_path, demo_dir):
    base = sweep.config_hash(compose_config(tmp_path, demo_dir, "prune.sparsity=0.3"))
    assert base == sweep.config_hash(
        compose_config(
            tmp_path, demo_dir, "prune.sparsity=0.3", "sweep.resume=false", "paths.output_dir=/x"
        )
    )
    assert base != sweep.config_hash(compose_config(tmp_path, demo_dir, "prune.sparsity=0.4"))
    rows = [
        {"prune.sparsity": "0.3", "sweep.resume": "True", "paths.output_dir": "/a"},
        {"prune.sparsity": "0.4", "sweep.resume": "False", "paths.output_dir": "/b"},
    ]
    assert sweep.swept_keys(rows, set(rows[0])) == ["prune.sparsity"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ft_sam.erase_area=[0.5,0.1]", "ft_sam.erase_area"),
        ("ft_sam.erase_area=[0.1]", "ft_sam.erase_area"),
        ("ft_sam.erasing=1.5", "ft_sam.erasing"),
        ("ft_sam.warmup=-0.1", "ft_sam.warmup"),
        ("ft_sam.lrs=[0.1,0.1]", "ft_sam.lrs"),
    ],
)
def test_a_repairs_out_of_range_values_name_their_key(tmp_path, demo_dir, override, key):
    cfg = compose_config(tmp_path, demo_dir, "repair=ft_sam", override)
    with pytest.raises(UserError, match=f"config key {key}="):
        config.validate(cfg)
