"""`tfds build data/image_captions` entry point; the builder lives in the package."""

from unclip_jax.data.image_captions import Builder  # noqa: F401 (registers it)
