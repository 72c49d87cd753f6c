"""Client of the RunPod LoRA worker: a library (:class:`WorkerClient`) and a CLI (``lora-worker``,
or ``python -m client``).

It hides RunPod's limits: datasets go up in inline batches under the 10 MB request limit or
straight to storage through presigned URLs, and output files are saved whether they come
back inline (base64) or as presigned redirects. Errors the worker reports raise
:class:`JobFailed` with its message; Ctrl-C cancels the running job and raises
:class:`JobInterrupted`.

    from client import WorkerClient

    with WorkerClient.for_endpoint("ENDPOINT_ID") as worker:   # RUNPOD_API_KEY from the environment
        worker.upload_dataset("photos/", dataset="cats")
        worker.train("cats", "cat-lora", steps=800, trigger_word="sks")
        worker.generate("a photo of sks cat", lora="cat-lora", out_dir="out/")
        worker.plan(base_model="black-forest-labs/FLUX.1-dev", gpu_memory_gb=24).fits   # before renting
"""

from client.api import GenerateResult, TrainResult, WorkerClient
from client.errors import (
    BadResponse,
    ClientError,
    DownloadError,
    JobFailed,
    JobInterrupted,
    JobTimeout,
    TransportError,
    UploadError,
)
from client.files import save_output_file
from client.hosts import HostPolicy
from client.schema import CaptionReport, MemoryPlan
from client.transport import LocalTransport, RunPodTransport, Transport
from client.uploads import UploadPlan, UploadReport, plan_upload

__all__ = [
    "BadResponse",
    "CaptionReport",
    "ClientError",
    "DownloadError",
    "GenerateResult",
    "HostPolicy",
    "JobFailed",
    "JobInterrupted",
    "JobTimeout",
    "LocalTransport",
    "MemoryPlan",
    "RunPodTransport",
    "TrainResult",
    "Transport",
    "TransportError",
    "UploadError",
    "UploadPlan",
    "UploadReport",
    "WorkerClient",
    "plan_upload",
    "save_output_file",
]
