"""Entry point: `python run.py [overrides]`. See README.md and conf/config.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from badnet_repair import UserError, config

config.register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from badnet_repair import pipeline

    try:
        metrics = pipeline.run(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: the MLflow run was ended as KILLED", file=sys.stderr)
        sys.exit(130)
    return metrics["repaired/clean_acc"]


if __name__ == "__main__":
    main()
