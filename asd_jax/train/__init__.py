"""Training: sharding, checkpoints, metrics, train state, steps and the loop.

Import the submodules directly (`from asd_jax.train import sharding, checkpoint, metrics`).
"""
