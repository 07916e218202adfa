"""The defenses: repairs (`repairs`, one module each: the BadNet and the defender's
clean data in, a repaired net out), detectors (`detectors`, one module each: what makes
the GoodNet answer "poisoned"), and what they share: the defender's data and the
per-BadNet memo (`clean`), the accuracy-budget rule that sets a repair's strength
(`budget`), the trigger search of Neural Cleanse and the leaderboard's probe
(`trigger_search`), and the GoodNet's assembly from standard Keras layers (`goodnet`).

A defense receives only the BadNet and the defender's clean validation data; the test
and poisoned sets live in `experiment`, which scores what a defense hands back.
"""
