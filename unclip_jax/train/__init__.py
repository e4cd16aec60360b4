"""Layer 4, training and runs: state, optimizer, checkpoints, the one generic loop, one task
per model family (:mod:`.tasks`), evaluation (:mod:`.eval`), the CLIP embedding cache
(:mod:`.embeddings`) and the one loader of trained runs (:mod:`.runs`)."""
