"""Converters from published (PyTorch) checkpoints into this package's params and workdirs.

Torch is never imported at module level: torch files are read lazily with
``weights_only=True``; ``.safetensors`` files need no torch at all.
"""
