"""Hydra sweeper `hydra/sweeper=optuna`: Optuna's ask-and-tell with Hydra's launchers.

Hydra finds it in the `hydra_plugins` namespace package; see `optuna_sweeper`.
"""
