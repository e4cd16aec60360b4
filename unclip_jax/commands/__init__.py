"""Layer 6, commands: the ``unclip-jax`` CLI (:mod:`.cli`; each family's sub-commands in its
own module, ``cli.COMMAND_MODULES``), the demo (:mod:`.demo`) and the local multi-process
launcher (:mod:`.launcher`)."""
