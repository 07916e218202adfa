"""Structured config schema: Hydra checks types against it, `validate` checks ranges.

Every key here is a parameter of one pipeline stage; see the README's config tree.
"""

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from badnet_repair import UserError


class PruneMethod(Enum):
    activation = "activation"
    magnitude = "magnitude"


class Detector(Enum):
    disagreement = "disagreement"
    strip = "strip"
    both = "both"


class Objective(Enum):
    clean_acc_under_asr = "clean_acc_under_asr"
    der = "der"


@dataclass
class PathsConfig:
    root: str = "${project_root:}"
    data: str = "${paths.root}/data"
    csaw: str = "${paths.data}/csaw"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class ModelConfig:
    name: str = MISSING
    file: str = MISSING
    architecture: str | None = None
    layer: str | None = None
    builder: str | None = None
    allow_unsafe: bool = False


@dataclass
class DataConfig:
    clean_validation: str = MISSING
    clean_test: str = MISSING
    poisoned: dict[str, str] = field(default_factory=dict)
    scale: float = 1.0 / 255.0
    source: str | None = None


@dataclass
class PruneConfig:
    method: PruneMethod = PruneMethod.activation
    sparsity: float = 0.5
    max_acc_drop: float | None = None
    frequency: int = 100


@dataclass
class FinetuneConfig:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    val_fraction: float = 0.1


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///${paths.root}/mlruns/mlflow.db"
    artifact_root: str = "${paths.root}/mlruns/artifacts"
    experiment: str = "${model.name}"


@dataclass
class GoodnetConfig:
    detector: Detector = Detector.disagreement
    frr: float = 0.05
    k: int = 32
    alpha: float = 0.5


@dataclass
class SweepConfig:
    resume: bool = True
    objective: Objective = Objective.clean_acc_under_asr
    asr_ceiling: float = 0.05


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    goodnet: GoodnetConfig = field(default_factory=GoodnetConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    eval_batch_size: int = 512


def project_root() -> str:
    """The folder holding pyproject.toml (the source checkout), else the working directory."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "conf").is_dir():
            return str(parent)
    return str(Path.cwd())


def register() -> None:
    """Register the schema and the `project_root` resolver with Hydra (idempotent)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", project_root)
    ConfigStore.instance().store(name="schema", node=Config)


def validate(cfg: DictConfig) -> None:
    """Check values the type system cannot, before any work starts."""
    from badnet_repair.models import ARCHITECTURES

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            f"config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}: required, "
            f"set on the command line (e.g. {missing[0]}=...)"
        )
    checks: list[tuple[str, Any, bool, str]] = [
        ("prune.sparsity", cfg.prune.sparsity, 0.0 <= cfg.prune.sparsity < 1.0, "in [0, 1)"),
        ("prune.frequency", cfg.prune.frequency, cfg.prune.frequency >= 1, ">= 1"),
        ("finetune.epochs", cfg.finetune.epochs, cfg.finetune.epochs >= 0, ">= 0"),
        ("finetune.lr", cfg.finetune.lr, cfg.finetune.lr > 0, "> 0"),
        ("finetune.batch_size", cfg.finetune.batch_size, cfg.finetune.batch_size >= 1, ">= 1"),
        (
            "finetune.val_fraction",
            cfg.finetune.val_fraction,
            0.0 <= cfg.finetune.val_fraction < 1.0,
            "in [0, 1)",
        ),
        ("data.scale", cfg.data.scale, cfg.data.scale > 0, "> 0"),
        ("goodnet.frr", cfg.goodnet.frr, 0.0 < cfg.goodnet.frr < 1.0, "in (0, 1)"),
        ("goodnet.alpha", cfg.goodnet.alpha, 0.0 < cfg.goodnet.alpha < 1.0, "in (0, 1)"),
        ("goodnet.k", cfg.goodnet.k, cfg.goodnet.k >= 1, ">= 1"),
        (
            "sweep.asr_ceiling",
            cfg.sweep.asr_ceiling,
            0.0 <= cfg.sweep.asr_ceiling <= 1.0,
            "in [0, 1]",
        ),
        ("eval_batch_size", cfg.eval_batch_size, cfg.eval_batch_size >= 1, ">= 1"),
        (
            "model.architecture",
            cfg.model.architecture,
            cfg.model.architecture in (None, *ARCHITECTURES),
            f"one of {', '.join(ARCHITECTURES)}, or null for a full model file",
        ),
        (
            "model.builder",
            cfg.model.builder,
            cfg.model.builder in (None, "demo"),
            "demo or null",
        ),
    ]
    drop = cfg.prune.max_acc_drop
    if drop is not None:
        checks.append(("prune.max_acc_drop", drop, 0.0 <= drop < 1.0, "in [0, 1) or null"))
        checks.append(
            (
                "prune.max_acc_drop",
                drop,
                cfg.prune.method == PruneMethod.activation,
                "null with prune.method=magnitude (the rule reads the activation curve)",
            )
        )
    for key, value, ok, expected in checks:
        if not ok:
            raise UserError(f"config key {key}={value!r}: expected {expected}")
    for name in cfg.data.poisoned:
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise UserError(
                f"config key data.poisoned.{name}: trigger names may hold letters, digits, _ and -"
            )
