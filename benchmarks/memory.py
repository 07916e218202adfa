"""Memory over a long sweep in one process: prints how much the resident memory grows per
sweep point, against one model's worth of weights.

Every point builds and evaluates a new repaired net and a new GoodNet; nothing may keep
them alive once the point is done (the issue's target: less than one model's worth of
growth per point). The demo BadNet is built into a temporary folder unless --data names
a folder holding `demo/`.

    python benchmarks/memory.py [--points 20] [--data DIR]
"""

import argparse
import gc
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resident_mb() -> float:
    """The process's resident set size now (not its peak), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--warm-up", type=int, default=3, help="points before measuring")
    parser.add_argument("--data", type=Path, help="a folder holding demo/ (built if absent)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    import badnet_repair  # noqa: F401
    from badnet_repair.experiment import config, pipeline
    from badnet_repair.network import models
    from badnet_repair.zoo import builds as demo

    config.register()
    data = args.data or Path(tempfile.mkdtemp())
    demo.ensure(data / "demo")
    root = Path(tempfile.mkdtemp())
    weights_mb = models.load_model(data / "demo" / "bd_net.h5").count_params() * 4 / 2**20

    def point(i: int) -> None:
        sparsity = round(0.05 + 0.9 * i / max(1, args.points - 1), 3)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"paths.root={root}",
                    f"paths.data={data}",
                    f"paths.output_dir={root}/out/{i}",
                    "repair=fine_pruning",  # the points this script was written for
                    "goodnet.detector=disagreement",
                    f"prune.sparsity={sparsity}",
                    "finetune.epochs=1",
                ],
            )
        pipeline.run(cfg)
        gc.collect()

    start = time.perf_counter()
    rss = []
    for i in range(args.points):
        point(i)
        rss.append(resident_mb())
        print(f"point {i + 1:2d}: resident {rss[-1]:7.1f} MB", flush=True)
    measured = rss[args.warm_up - 1 :]
    per_point = (measured[-1] - measured[0]) / max(1, len(measured) - 1)
    print(
        f"\n{args.points} points in {time.perf_counter() - start:.0f}s; resident memory grew "
        f"{per_point:.2f} MB per point after {args.warm_up} warm-up points "
        f"({measured[0]:.0f} -> {measured[-1]:.0f} MB); one model's weights: {weights_mb:.2f} MB; "
        f"ratio {per_point / weights_mb:.2f} (target < 1)"
    )


if __name__ == "__main__":
    main()
