"""Layer 1, the core: what every model and stage builds on, importing nothing above it.

:mod:`.config` (frozen dataclass configs, files, overrides), :mod:`.sharding` (mesh,
logical-axis rules, multi-host), :mod:`.images`, :mod:`.text` (tokenizer), :mod:`.shapes`
(the captioned-shapes world and its judge), :mod:`.augment`, :mod:`.ar` (the one
autoregressive decoder), :mod:`.diffusion` (schedules, losses, the one sampler) and
:mod:`.nn` (layers, attention, transformer, U-Net, ViT).
"""
