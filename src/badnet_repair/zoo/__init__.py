"""The demo BadNets: declarative recipes (`recipes`: images, poisoning, architecture, a
fixed build seed; the `triggers` they stamp) and their deterministic builds into the
competition's file formats (`builds`, also `python -m badnet_repair.zoo.builds NAME`).

It stands above `network` (it trains its nets with the same loop the repairs use) and
below the defenses, which never import it: a defense sees only a model and clean data.
"""
