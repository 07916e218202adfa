"""Entry point: `python run.py [overrides]`, or `-m` for a sweep. See README.md."""

import sys

from badnet_repair.console import quiet_native_logs

quiet_native_logs()  # before TensorFlow loads; TF_CPP_MIN_LOG_LEVEL=0 shows its own logs

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from badnet_repair import UserError  # noqa: E402
from badnet_repair.experiment import config  # noqa: E402

config.register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from badnet_repair.experiment import pipeline, sweep

    hydra_cfg = HydraConfig.get()
    run_name = parent = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        run_name = " ".join(hydra_cfg.overrides.task) or "default"
        parent = sweep.read_parent(hydra_cfg.sweep.dir)
    try:
        metrics = pipeline.run(cfg, run_name=run_name, parent_run_id=parent)
    except UserError as e:
        sys.exit(f"error: {e}")
    return metrics["objective"]


def cli() -> None:
    """Ctrl-C and SIGTERM exit 130 at any moment, and a sweep that stops early ends its
    MLflow parent run (the runs themselves end FAILED or KILLED in `tracking`)."""
    from hydra._internal.utils import get_args_parser

    from badnet_repair.experiment import sweep, tracking

    tracking.interrupt_on_signals()
    try:
        config.check_overrides(get_args_parser().parse_args().overrides)
    except UserError as e:
        sys.exit(f"error: {e}")
    try:
        main()
    except BaseException as e:
        sweep.end_open_parent(e)
        if isinstance(e, KeyboardInterrupt):
            print("interrupted: MLflow runs in progress were ended as KILLED", file=sys.stderr)
            sys.exit(130)
        raise


if __name__ == "__main__":
    cli()
