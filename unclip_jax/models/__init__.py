"""The model families, one module each:

* :mod:`.clip` — CLIP (ViT image tower + causal text transformer, contrastive loss);
* :mod:`.dvae` — DALL·E's discrete VAE (stage 1);
* :mod:`.dalle` — the DALL·E transformer over text then image tokens (stage 2);
* :mod:`.prior` — unCLIP's diffusion prior; :mod:`.prior_ar` — its autoregressive prior;
* :mod:`.decoder` — unCLIP's decoder (ADM U-Net on CLIP image embeddings) and the diffusion
  upsamplers.

CLIP's names are re-exported here; import the other families from their modules.
"""

from unclip_jax.models.clip import CLIP, CLIPConfig, contrastive_loss

__all__ = ["CLIP", "CLIPConfig", "contrastive_loss"]
