"""MMA-DFER in JAX/Flax: multimodal adaptation of frozen ViT encoders for dynamic facial expression recognition."""
