"""Text-to-image pipelines: compositions of trained models as pure, jitted functions."""
