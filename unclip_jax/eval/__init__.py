"""Evaluation: zero-shot accuracy (CLIP score, Fréchet distance and binding to come)."""
