"""Durable training state in storage: checkpoints, snapshots and the runner's way to them.

May import: ``services.job``, ``services.storage``, ``services.errors``, ``config``.
"""
