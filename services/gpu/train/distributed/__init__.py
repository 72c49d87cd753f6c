"""Data-parallel LoRA training over the GPUs of one worker (torch.distributed).

Rank 0 is the job's own GPU thread (it alone talks to storage, reports progress, saves
checkpoints, snapshots and the LoRA); ranks 1..N-1 are processes it spawns for the job
(:mod:`.rank`), each with the frozen base and a replica of the LoRA on its own GPU.

- :mod:`services.gpu.train.world`: how many ranks a job trains on (the ``gpus`` input, the worker's GPUs,
  ``TRAIN_CPU_RANKS`` on the CPU) and the refusal of a checkpoint of another world size.
- :mod:`.collectives`: the gradient all-reduce, the per-step stop broadcast, the replica digest.
- :mod:`.group`: rank 0's side: spawn, wait until every rank is ready, the hook, teardown.
- :mod:`.rank`: the other ranks' process entry.

Why a hand-written all-reduce rather than DDP: the trainable tensors are the LoRA's few MB; one
flat all-reduce per optimizer step (after the gradient accumulation) carries them and the loss
together, DDP would broadcast the whole frozen base at wrap time and needs ``no_sync`` for
accumulation and a wrapped forward that every family's ``predict`` would have to accept.
"""
