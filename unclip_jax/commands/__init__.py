"""Sub-commands of `unclip-jax` contributed by each model family (see cli.COMMAND_MODULES)."""
