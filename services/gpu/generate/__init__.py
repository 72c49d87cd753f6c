"""Image generation with a job's LoRA applied and removed. Imports torch inside functions only."""
