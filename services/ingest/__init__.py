"""Everything that comes in: SSRF-safe URL fetches and their resolver, the URL type, zip safety,
the image gate, the batch upload of training files and the training dataset fetch.

May import: ``services.job``, ``services.storage``, ``services.errors``, ``config``.
"""
