"""`tfds build data/captioned_shapes` entry point; the builder lives in the package."""

from unclip_jax.data.captioned_shapes import CaptionedShapes  # noqa: F401 (registers it)
