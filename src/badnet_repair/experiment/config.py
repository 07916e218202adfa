"""Structured config schema: Hydra checks types against it, `validate` checks ranges.
A default lives in one place: the config file that sets the section.

The pipeline's own sections (paths, model, data, goodnet, tracking, sweep) are typed
here. Each repair types the sections it reads (`prune`, `finetune`, ...) in its own
module (see `badnet_repair.defenses.repairs`); those sections exist only when that repair is
chosen, so `python run.py repair=NAME --cfg job` shows exactly what it reads.

A key's allowed range is written once, beside its type (`ranged`), and checked for
every section by `validate` before any work.
"""

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, AnyNode, DictConfig, IntegerNode, OmegaConf, open_dict

from badnet_repair import UserError
from badnet_repair.ranges import in_range, ranged


class Auxiliary(Enum):
    auto = "auto"  # repaired where the repair has an FT-SAM step, else ft_sam
    repaired = "repaired"  # the run's repaired net B'
    ft_sam = "ft_sam"  # B repaired by FT-SAM (the run's ft_sam section, else its defaults)
    finetuned = "finetuned"  # B fine-tuned on the true labels of the clean training split


class Objective(Enum):
    holdout_acc = "holdout_acc"  # clean data only
    oracle_clean_acc_under_asr = "oracle_clean_acc_under_asr"  # reads test and poisoned sets
    oracle_der = "oracle_der"


@dataclass
class PathsConfig:
    """paths.*: every file location derives from `root`, so runs behave alike anywhere."""

    root: str = MISSING
    data: str = MISSING
    csaw: str = MISSING
    output_dir: str = MISSING


@dataclass
class ModelConfig:
    """model.*: the BadNet file, how to load it, the layer single-layer repairs work on."""

    name: str = MISSING
    file: str = MISSING
    architecture: str | None = None
    layer: str | None = None
    builder: str | None = None
    build_scale: float = ranged(1.0, "(0, 1]")  # < 1: a tiny demo build (tests)
    allow_unsafe: bool = False


@dataclass
class DataConfig:
    """data.*: the clean validation (the defender's), clean test and poisoned sets."""

    clean_validation: str = MISSING
    clean_test: str = MISSING
    poisoned: dict[str, str] = field(default_factory=dict)
    scale: float = ranged(1.0 / 255.0, "> 0")
    holdout: float = ranged(0.1, "(0, 1)")  # the only section without a file of defaults
    source: str | None = None


@dataclass
class GoodnetConfig:
    """goodnet.*: the detector that makes the GoodNet answer N, and its settings."""

    detector: Any = MISSING  # a detector's name, `both`, or a list of names
    frr: float = ranged(MISSING, "(0, 1)")
    k: int = ranged(MISSING, ">= 1")
    alpha: float = ranged(MISSING, "(0, 1)")
    expert_lr: float = ranged(MISSING, "> 0")
    expert_epochs: int = ranged(MISSING, ">= 1")
    expert_batch_size: int = ranged(MISSING, ">= 1")
    expert_stop_acc: float = ranged(MISSING, "(0, 1]")
    auxiliary: Auxiliary = MISSING
    aux_lr: float = ranged(MISSING, "> 0")
    aux_epochs: int = ranged(MISSING, ">= 1")
    pixel_max: float = ranged(MISSING, "> 0")
    scale_up_factors: list[float] = MISSING
    scale_up_classwise: bool = MISSING
    teco_corruptions: list[str] = MISSING


@dataclass
class SweepConfig:
    """sweep.*: resuming sweeps, and what a sweeper maximises."""

    resume: bool = MISSING
    objective: Objective = MISSING
    asr_ceiling: float = ranged(MISSING, "[0, 1]")
    leaderboard: bool = MISSING


@dataclass
class TrackingConfig:
    """tracking.*: the MLflow store and experiment."""

    uri: str = MISSING
    artifact_root: str = MISSING
    experiment: str = MISSING


PIPELINE_SECTIONS = {
    "paths": PathsConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "goodnet": GoodnetConfig,
    "tracking": TrackingConfig,
    "sweep": SweepConfig,
}
ROOT_KEYS = {"seed": "[0, 4294967295]", "eval_batch_size": ">= 1"}
CHAIN = "chain"  # the repairs chosen, in order, as composed (`settle` turns it into `repair`)


def project_root() -> str:
    """The folder holding pyproject.toml (the source checkout), else the working directory."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "conf").is_dir():
            return str(parent)
    return str(Path.cwd())


def register() -> None:
    """Register the schemas and the `project_root` resolver with Hydra (idempotent).

    The root is a plain node holding typed sections, so that each repair's config can
    add the sections it reads (typed by `schema/repair/<name>`), and a chain's several.
    """
    from badnet_repair.defenses import repairs

    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", project_root)
    store = ConfigStore.instance()
    root = {
        **PIPELINE_SECTIONS,
        "repair": AnyNode(MISSING),  # a name, or a list of names: a chain
        "seed": IntegerNode(MISSING),
        "eval_batch_size": IntegerNode(MISSING),
    }
    store.store(name="schema", node=OmegaConf.create(root))
    for name in repairs.names():  # plain nodes of typed sections: a chain merges several
        node = {f.name: f.type for f in dataclasses.fields(repairs.settings(name))}
        node.pop("repair")  # each repair's file sets it
        node[CHAIN] = {name: None}  # merged in the order chosen; `settle` reads it
        store.store(
            group="schema/repair", name=name, node=OmegaConf.create(node), package="_global_"
        )


def settle(cfg: DictConfig) -> None:
    """Turn composition's record of the repairs chosen into `repair`: a name, or the list
    of a chain's steps in the order chosen (Hydra's `repair=[a,b]` merges the files, which
    leaves `repair` the last one's name); then drop the record. Idempotent."""
    from badnet_repair.defenses import repairs

    if CHAIN in cfg:
        chosen = repairs.steps(cfg)
        with open_dict(cfg):
            cfg.repair = chosen if len(chosen) > 1 else chosen[0]
            del cfg[CHAIN]


def _check_section(name: str, node: DictConfig) -> None:
    """Range checks (`ranged`) and a section's own `check` method, if it has one."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    for spec in dataclasses.fields(schema):
        allowed = spec.metadata.get("range")
        value = node.get(spec.name)
        if allowed and value is not None and not in_range(value, allowed):
            expected = f"in {allowed}" if allowed[0] in "[(" else allowed
            raise UserError(f"config key {name}.{spec.name}={value!r}: expected {expected}")
    if hasattr(schema, "check"):
        OmegaConf.to_object(node).check()


def validate(cfg: DictConfig) -> None:
    """Check values the type system cannot, before any work starts."""
    from badnet_repair.defenses import detectors, repairs
    from badnet_repair.network.models import ARCHITECTURES
    from badnet_repair.zoo import recipes

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            f"config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}: required, "
            f"set on the command line (e.g. {missing[0]}=...)"
        )
    for key, allowed in ROOT_KEYS.items():
        if not in_range(cfg[key], allowed):
            raise UserError(f"config key {key}={cfg[key]!r}: expected {allowed}")
    chosen = repairs.steps(cfg)
    if len(chosen) == 1 and chosen[0] not in repairs.names():
        raise UserError(
            f"config key repair={chosen[0]!r}: expected one of {', '.join(repairs.names())}"
        )
    repairs.check_chain(chosen)
    known = {s for name in repairs.names() for s in repairs.sections(name)} | {"repair", CHAIN}
    for section in set(cfg) - set(PIPELINE_SECTIONS) - set(ROOT_KEYS) - known:
        raise UserError(f"config section {section}: unknown (no repair reads it)")
    for name, node in cfg.items():
        if isinstance(node, DictConfig):
            _check_section(str(name), node)
    checks = [
        (
            "model.architecture",
            cfg.model.architecture,
            cfg.model.architecture in (None, *ARCHITECTURES),
            f"one of {', '.join(ARCHITECTURES)}, or null for a full model file",
        ),
        (
            "model.builder",
            cfg.model.builder,
            cfg.model.builder in (None, *recipes.BUILDERS),
            f"one of {', '.join(recipes.BUILDERS)}, or null",
        ),
    ]
    for key, value, ok, expected in checks:
        if not ok:
            raise UserError(f"config key {key}={value!r}: expected {expected}")
    detectors.parse(cfg.goodnet.detector)
    for name in cfg.data.poisoned:
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise UserError(
                f"config key data.poisoned.{name}: trigger names may hold letters, digits, _ and -"
            )


def _repair_choices(overrides: list) -> list[list[str]]:
    """The repairs each run of a command runs, as chains (a single repair is a chain of
    one): its `repair=` override, else the composed config's choice and any repairs its
    sweeper sweeps (an experiment may set both)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from badnet_repair.defenses import repairs

    def chain(value) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    def values(override) -> list[list[str]]:
        if isinstance(override.value(), Glob):
            return [[name] for name in override.value().filter(repairs.names())]
        if override.is_sweep_override():
            return [chain(value) for value in override.sweep_iterator()]
        return [chain(override.value())]

    given = [o for o in overrides if o.key_or_group == "repair"]
    if given:
        return values(given[-1])
    kept = [
        o.input_line for o in overrides if not o.is_sweep_override() and "." not in o.key_or_group
    ]
    with initialize_config_dir(config_dir=f"{project_root()}/conf", version_base="1.3"):
        cfg = compose("config", overrides=kept, return_hydra_config=True)
    chosen = [repairs.steps(cfg)]
    swept = OmegaConf.select(cfg, "hydra.sweeper.params.repair")
    if swept is not None:
        chosen += values(OverridesParser.create().parse_override(f"repair={swept}"))
    return chosen


def check_overrides(overrides: list[str]) -> None:
    """One clear line, before Hydra composes, for overrides no run could honour: a key of a
    section that the chosen repair does not read (Hydra's own error takes several lines and
    suggests adding the key, which the repair would then ignore), a chain that names an
    unknown repair or one twice, or the old `prune` group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from badnet_repair.defenses import repairs

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return
    for o in parsed:
        if o.key_or_group == "prune":
            raise UserError(
                f"{o.input_line}: the prune group is now the repair group: "
                "repair=fine_pruning (activation ranking) or repair=magnitude"
            )
    for o in parsed:  # a chain's names, before Hydra's multi-line errors on them
        if o.key_or_group == "repair" and not isinstance(o.value(), Glob):
            values = o.sweep_iterator() if o.is_sweep_override() else [o.value()]
            for value in values:
                if isinstance(value, list):
                    repairs.check_chain([str(v) for v in value])
    readers: dict[str, list[str]] = {}
    for name in repairs.names():
        for section in repairs.sections(name):
            readers.setdefault(section, []).append(name)
    keys = [
        o
        for o in parsed
        if o.key_or_group.split(".")[0] in readers and not (o.is_force_add() or o.is_delete())
    ]
    if not keys:
        return
    try:
        chosen = _repair_choices(parsed)
    except Exception:  # noqa: BLE001 - composition errors are Hydra's to report
        return
    for o in keys:
        section = o.key_or_group.split(".")[0]
        runs = {"+".join(steps): steps for steps in chosen}  # each run once, in order
        unread = [
            name
            for name, steps in runs.items()
            if not any(section in repairs.sections(step) for step in steps)
        ]
        if unread:
            raise UserError(
                f"config key {o.key_or_group}: not read by repair={','.join(unread)} "
                f"(read by {', '.join(readers[section])}); in a sweep over repairs, "
                f"++{o.key_or_group}=... sets it where it is read"
            )
