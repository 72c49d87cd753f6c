"""Automatic captions with a vision-language model (``caption_dataset``, ``auto_caption``).

:mod:`.options` (job inputs) and :mod:`.text` (cleaning and composing captions) import no
torch; :mod:`.model` (loading the captioner) and :mod:`.run` (batches, progress, stop) do,
inside their functions.
"""
