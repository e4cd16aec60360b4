"""Models: CLIP (more to come: dVAE, DALL·E, priors, decoder, upsamplers)."""

from unclip_jax.models.clip import CLIP, CLIPConfig, contrastive_loss

__all__ = ["CLIP", "CLIPConfig", "contrastive_loss"]
