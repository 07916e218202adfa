"""The network and its surgery: loading and saving Keras models without running code
stored in them (`models`), reading a model's layer graph and replaying it (`topology`),
forward passes that measure (`predict`), removing channels and weights (`pruning`,
`channels`, `curve`) and the one training loop every repair and build uses (`training`).

Nothing here knows about backdoors, defenses or experiments: these are the tools the
defenses are built from.
"""
