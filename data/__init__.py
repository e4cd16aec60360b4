"""TFDS dataset builders of unclip_jax (each buildable with `tfds build data/<name>`)."""
