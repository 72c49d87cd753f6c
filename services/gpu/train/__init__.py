"""LoRA training: the ``train_lora`` job runner, the family-agnostic loop, the dataset and its
buckets, checkpoint state capture and the durability hook. Imports torch inside functions only.
"""
