"""Services behind the RunPod handler, one package per layer (each imports only the layers below it).

``actions`` (the registry, input schemas, result models, API docs) -> ``gpu`` (the runner: torch and
diffusers, loaded lazily) -> ``durable`` / ``ingest`` (training state in storage; everything that comes
in) -> ``job`` / ``output`` (the per-job context; the output policy) -> ``storage`` (objects and the key
layout) -> ``errors`` and ``config``. ``tests/test_layers.py`` enforces the order.
"""
