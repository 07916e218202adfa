"""A tiny Hydra app searched by our Optuna sweeper in tests: cheap, with an optimum at
x=1, y=0, and a way to fail (x above `fail_above`) or to be slow (`pause` seconds)."""

import time

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    if cfg.pause:
        print(f"pausing {cfg.pause} s", flush=True)  # a test interrupts the job from here on
    time.sleep(cfg.pause)
    if cfg.fail_above is not None and cfg.x > cfg.fail_above:
        raise RuntimeError(f"x={cfg.x} is above {cfg.fail_above}")
    return -((cfg.x - 1) ** 2) - cfg.y**2


if __name__ == "__main__":
    main()
