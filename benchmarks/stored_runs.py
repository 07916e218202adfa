"""What the scripts that read finished runs back from MLflow share: the stores and
experiments to read (`--tracking-uri`, `--experiment`, each repeatable) and the report."""

import argparse
from collections.abc import Callable

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"


def arguments(description: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line: `tracking_uri` (a list, the project's store by default) and
    `experiment` (a list; empty: every experiment)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--tracking-uri", action="append", default=None, help=f"a store (default {DEFAULT_URI})"
    )
    parser.add_argument("--experiment", action="append", default=[], help="(default: all)")
    args = parser.parse_args(argv)
    args.tracking_uri = args.tracking_uri or [DEFAULT_URI]
    return args


def report(runs: list[dict], table: Callable[[list[dict]], str], none_found: str) -> int:
    """Print the table of `runs`, or say that none was found (exit status 1)."""
    if not runs:
        print(none_found)
        return 1
    print(table(runs))
    return 0
