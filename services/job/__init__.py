"""The job layer: per-job context (settings, storage, workspace, progress, stop signal), the stop
signal itself, shutdown on SIGINT/SIGTERM, local ``--test_input`` runs and logging.

May import: ``services.storage``, ``services.errors``, ``config``.
"""
