"""Layer 5, using trained models: text-to-image pipelines as pure, jitted functions (the one
place stages are sampled: :mod:`unclip_jax.models.sampling` holds the stages), import of
pretrained weights (:mod:`.convert`) and :mod:`.describe`."""
