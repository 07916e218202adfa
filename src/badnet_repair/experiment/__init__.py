"""The experiment: the typed config and its checks (`config`), the pipeline that runs
one experiment as a short sequence of stages (`pipeline`), scoring on the evaluation
sets (`report`, `evaluate`), MLflow tracking (`tracking`), sweeps and their summaries
(`sweep`), Optuna searches (`search`, `search_space`; the sweeper Hydra finds is in
`hydra_plugins.badnet_repair_search`), the zoo leaderboard (`leaderboard`, with its
clean-data `probe`), and the GoodNet's command line (`answer`).

This is the only package that reads the clean test and poisoned sets, and the only one
that reads the config; everything below it takes plain arguments.
"""
