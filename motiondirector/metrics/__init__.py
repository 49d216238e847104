"""Evaluation metrics of generated videos (the paper's CLIP-based scores)."""
