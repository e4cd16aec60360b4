"""Training machinery: state, optimizer, checkpoints and the one generic loop."""
