"""Services behind the RunPod handler: storage, outputs, actions and the GPU runner."""
