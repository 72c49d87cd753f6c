"""GPU runner: LoRA training and image generation with diffusers + peft + torch.

Nothing heavy is imported here. :mod:`services.gpu.params` (the job inputs, pydantic) and
:mod:`services.gpu.info` (health) never import torch; :mod:`services.gpu.train.job` (the
``train_lora`` job runner, around the loop in :mod:`services.gpu.train.trainer`) and
:mod:`services.gpu.generate.render` import torch, diffusers and peft inside their functions, so the
storage actions of the worker start and run without them. Everything that differs between
model families lives in :mod:`services.gpu.families`.

The runner core (everything except ``params``) needs only the standard library, torch,
diffusers, transformers, peft, safetensors and Pillow, so ``bench/gpu.py`` runs it on a GPU
machine without pydantic.
"""

SOFTWARE_NAME = "runpod-lora-worker"
SOFTWARE_VERSION = "0.1.0"
