"""What a config costs before anything is allocated: parameters, bytes per device, activations.

``describe(cfg, mesh_shape=(data, fsdp, model))`` builds the model's parameters under
``jax.eval_shape`` only (no arrays, no devices, no data or tokenizer), so it runs for a 12B
model on a laptop. Per-device bytes are computed arithmetically from each parameter's logical
partition spec and the preset's rules table: a leaf of shape ``(d_0, …)`` whose dim ``i`` maps
to mesh axes ``A_i`` holds ``∏ ceil(d_i / ∏_{a ∈ A_i} size(a))`` elements per device (uneven
dims round up, as a padded shard does). The train state per device is params (float32) + AdamW's
two float32 moments + an EMA copy when ``train.ema_decay > 0``; gradients (float32, sharded like
the params) are listed separately since they live only inside the step.

Activation estimate (per device, for the backward pass; ``b`` = local batch =
``ceil(batch / (data · fsdp))``, ``t`` = model-axis size under ``fsdp_tp`` else 1, bfloat16
activations unless noted):

* transformer layer (width ``h``, ``a`` heads, ``s`` tokens), bytes per token, after Korthikanti
  et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2, no
  sequence parallelism): ``remat=none``: ``10h + 24h/t + 5as/t``; ``dots_saveable``: the matmul
  outputs plus the layer input, ``2h + 2(h + 8h)/t + 2as/t`` (q, k, v, attention output, MLP
  in/out, and the score matrix); ``full``: the layer input only, ``2h``, plus one layer's
  ``none`` working set (recomputed during its backward);
* output heads over a vocabulary ``V``: float32 logits and their log-softmax, ``8V/t`` per token;
* U-Net (no remat option): per residual block at side ``r``, ``r²·(8·c_in + 16·c_out)`` bytes
  (input, float32 GroupNorm output, SiLU; conv, float32 norm/FiLM, SiLU, conv, sum); per
  attention block ``16·r²·c`` plus float32 logits and probabilities ``8·n·r²·(r² + L_ctx)``
  for ``n`` heads and ``L_ctx`` context tokens; upsamplers at their training crop;
* dVAE: per residual block ``r²·(2·c_in + 6·c_h·3 + 4·c_out)`` (the three hidden ReLU/conv
  pairs at ``c_h = c_out/4``), plus float32 logits ``4·g²·K`` and the decoder's 6-channel
  float32 statistics.

These are estimates to size a mesh, not measurements; XLA's buffer reuse and fusion change the
real figure by tens of percent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core import sharding
from unclip_jax.core.nn.unet import res_blocks_per_level

GiB = 1024 ** 3


# ----------------------------------------------------------------------------- abstract params


def _sds(shape, dtype=jnp.float32):
    """A zero input of ``shape``: only ever built inside ``jax.eval_shape``'s trace, where it is
    a staged-out constant, never an allocated array."""
    return jnp.zeros(tuple(shape), dtype)


def model_config(cfg) -> Any:
    """The model config with the fields the task would set from ``cfg.data`` (resolution,
    text length); fields that need the tokenizer or a trained CLIP keep the config's values."""
    m, d, task = cfg.model, cfg.data, cfg.task
    if task == "clip":
        return dataclasses.replace(m, image_size=d.image_size, context_length=d.context_length)
    if task == "decoder":   # the alignment head's width is the CLIP tower's: its embedding
        return dataclasses.replace(     # width stands in (only the head's last layer differs)
            m, image_size=d.image_size, context_length=d.context_length,
            repa_dim=m.repa_dim or (m.clip_dim if m.repa_weight > 0 else 0))
    if task in ("upsampler", "dvae"):
        return dataclasses.replace(m, image_size=d.image_size)
    if task == "dalle":
        return dataclasses.replace(m, text_length=d.context_length)
    return m


def abstract_params(cfg) -> Any:
    """The boxed (``LogicallyPartitioned``) params of ``cfg``'s model as ShapeDtypeStructs."""
    task, m = cfg.task, model_config(cfg)
    rng = jax.random.PRNGKey(0)
    if task == "clip":
        from unclip_jax.models.clip import CLIP
        fn = lambda r: CLIP(m).init(r, _sds((1, m.image_size, m.image_size, 3)),  # noqa: E731
                                    _sds((1, m.context_length), jnp.int32))
    elif task == "prior":
        from unclip_jax.models.prior import DiffusionPrior
        cond = {"text_emb": _sds((1, m.embed_dim)),
                "text_states": _sds((1, m.context_length, m.text_width)),
                "text_mask": _sds((1, m.context_length), jnp.bool_)}
        fn = lambda r: DiffusionPrior(m).init(r, _sds((1, m.embed_dim)),  # noqa: E731
                                              _sds((1,), jnp.int32), cond)
    elif task == "prior_ar":
        from unclip_jax.models.prior_ar import ARPrior
        cond = {"text_states": _sds((1, m.text_length, m.text_width)),
                "text_tokens": _sds((1, m.text_length), jnp.int32),
                "text_emb": _sds((1, m.embed_dim))}
        fn = lambda r: ARPrior(m).init(r, _sds((1, m.pca_dims + 1), jnp.int32),  # noqa: E731
                                       cond)
    elif task == "decoder":
        from unclip_jax.models.decoder import init_decoder
        fn = lambda r: init_decoder(m, r, 1)  # noqa: E731
    elif task == "upsampler":
        from unclip_jax.models.decoder import init_upsampler
        fn = lambda r: init_upsampler(m, r, 1)  # noqa: E731
    elif task == "dvae":
        from unclip_jax.models.dvae import DVAE
        fn = lambda r: DVAE(m).init(r, _sds((1, m.image_size, m.image_size, 3)))  # noqa: E731
    elif task == "dalle":
        from unclip_jax.models.dalle import DalleTransformer
        fn = lambda r: DalleTransformer(m).init(  # noqa: E731
            r, _sds((1, m.seq_length - 1), jnp.int32))
    else:
        raise ValueError(f"describe does not know task {task!r}; accepted: clip, prior, "
                         "prior_ar, decoder, upsampler, dvae, dalle")
    return jax.eval_shape(fn, rng)["params"]


# ----------------------------------------------------------------------------- sharding arithmetic


def shard_elements(shape: tuple[int, ...], mesh_spec, sizes: dict[str, int]) -> int:
    """Elements one device holds of a leaf ``shape`` sharded by the mesh-axis ``mesh_spec``."""
    spec = tuple(mesh_spec) + (None,) * (len(shape) - len(tuple(mesh_spec)))
    n = 1
    for dim, axes in zip(shape, spec):
        if axes is None:
            factor = 1
        else:
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            factor = int(np.prod([sizes[a] for a in axes]))
        n *= -(-dim // factor)
    return n


def per_device_param_elements(boxed_params, mesh_shape, preset: str) -> tuple[int, int]:
    """``(total elements, elements per device)`` of ``boxed_params`` under ``preset`` on a mesh
    of ``mesh_shape = (data, fsdp, model)`` sizes (no devices needed)."""
    sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
    rules = sharding.logical_rules(preset)
    logical = nn.get_partition_spec(boxed_params)
    leaves = jax.tree.leaves(sharding.strip_boxes(boxed_params))
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    if len(leaves) != len(specs):
        raise AssertionError(f"{len(leaves)} parameter leaves but {len(specs)} partition specs")
    total = local = 0
    for leaf, spec in zip(leaves, specs):
        total += math.prod(leaf.shape)
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else ()
        local += shard_elements(leaf.shape, mesh_spec, sizes)
    return total, local


# ----------------------------------------------------------------------------- activations


def _transformer_bytes(tokens: int, width: int, heads: int, seq: int, layers: int,
                       remat: str, t: int, mlp_ratio: float = 4.0) -> float:
    """Saved activation bytes of ``layers`` blocks for ``tokens`` tokens (module docstring)."""
    h, a, s = width, heads, seq
    mlp = mlp_ratio / 4.0
    none = 10 * h + 24 * h * mlp / t + 5 * a * s / t
    if remat == "none":
        per_layer, extra = none, 0.0
    elif remat.startswith("dots"):
        per_layer, extra = 2 * h + 2 * (h + 8 * h * mlp) / t + 2 * a * s / t, 0.0
    else:   # full / nothing saveable: layer inputs, plus one layer's working set
        per_layer, extra = 2 * h, none
    return tokens * (layers * per_layer + extra)


def _unet_bytes(b: int, side: int, in_ch: int, base: int, mult, num_res, attn_ds,
                middle_attn: bool, head_ch: int, ctx_len: int) -> float:
    """Saved activation bytes of the ADM U-Net walk of ``unclip_jax.core.nn.unet.UNet``."""
    total = 0.0

    def res(r, cin, cout):
        return r * r * (8 * cin + 16 * cout)

    def attn(r, c):
        n = max(1, c // head_ch)
        return 16 * r * r * c + 8 * n * r * r * (r * r + ctx_len)

    blocks = res_blocks_per_level(num_res, len(mult))
    r, ds = side, 1
    ch = base * mult[0]
    total += r * r * (2 * in_ch + 2 * ch)
    skips = [ch]
    for level, m in enumerate(mult):
        out = base * m
        for _ in range(blocks[level]):
            total += res(r, ch, out)
            ch = out
            if ds in attn_ds:
                total += attn(r, ch)
            skips.append(ch)
        if level != len(mult) - 1:
            r //= 2
            ds *= 2
            total += res(r, ch, ch)
            skips.append(ch)
    total += 2 * res(r, ch, ch) + (attn(r, ch) if middle_attn else 0)
    for level in reversed(range(len(mult))):
        out = base * mult[level]
        for _ in range(blocks[level] + 1):
            total += res(r, ch + skips.pop(), out)
            ch = out
            if ds in attn_ds:
                total += attn(r, ch)
        if level != 0:
            r *= 2
            ds //= 2
            total += res(r, ch, ch)
    total += r * r * ch * 6
    return b * total


def _dvae_bytes(b: int, m) -> float:
    total, r = 0.0, m.image_size
    c = m.encoder_width
    total += r * r * (4 * 3 + 2 * c)
    for g in range(m.num_groups):
        out = m.encoder_width * 2 ** g
        for _ in range(m.blocks_per_group):
            total += r * r * (2 * c + 18 * (out // 4) + 4 * out)
            c = out
        if g < m.num_groups - 1:
            r //= 2
    total += 4 * r * r * m.vocab_size * 3     # logits, softmax relaxation, KL terms (float32)
    c = m.decoder_init_width
    for g in range(m.num_groups):
        out = m.decoder_width * 2 ** (m.num_groups - 1 - g)
        for _ in range(m.blocks_per_group):
            total += r * r * (2 * c + 18 * (out // 4) + 4 * out)
            c = out
        if g < m.num_groups - 1:
            r *= 2
    total += r * r * 6 * 4 * 3
    return b * total


def activation_bytes(cfg, local_batch: int, t: int) -> float:
    """Estimated activation bytes per device for one training step (module docstring)."""
    task, m, b = cfg.task, model_config(cfg), local_batch
    if task == "clip":
        n_img = 1 + (m.image_size // m.patch_size) ** 2
        return (_transformer_bytes(b * n_img, m.vision_width, m.vision_heads, n_img,
                                   m.vision_layers, m.remat, t, m.mlp_ratio)
                + _transformer_bytes(b * m.context_length, m.text_width, m.text_heads,
                                     m.context_length, m.text_layers, m.remat, t, m.mlp_ratio))
    if task == "prior":
        s = m.context_length + 4
        return _transformer_bytes(b * s, m.width, m.num_heads, s, m.depth, m.remat, t,
                                  m.mlp_ratio)
    if task == "prior_ar":
        s = m.seq_length
        return (_transformer_bytes(b * s, m.width, m.num_heads, s, m.depth, m.remat, t,
                                   m.mlp_ratio) + b * s * 8 * m.num_buckets / t)
    if task == "dalle":
        s = m.seq_length - 1
        return (_transformer_bytes(b * s, m.width, m.num_heads, s, m.depth, m.remat, t,
                                   m.mlp_ratio) + b * s * 8 * m.vocab_size / t)
    if task == "decoder":
        side = m.image_size // m.patch_size
        ds = tuple(side // r for r in m.attention_resolutions if r <= side and side % r == 0)
        ctx = m.num_clip_tokens + (m.context_length if m.use_text else 0)
        text = (_transformer_bytes(b * m.context_length, m.text_width, m.text_heads,
                                   m.context_length, m.text_layers, "none", t)
                if m.use_text else 0.0)
        return text + _unet_bytes(b, side, 3 * m.patch_size ** 2, m.base_channels,
                                  m.channel_mult, m.num_res_blocks, ds, True, m.head_channels,
                                  ctx)
    if task == "upsampler":
        return _unet_bytes(b, m.train_crop // m.patch_size, 6 * m.patch_size ** 2,
                           m.base_channels, m.channel_mult, m.num_res_blocks, (), False, 64, 0)
    if task == "dvae":
        return _dvae_bytes(b, m)
    raise ValueError(f"describe does not know task {task!r}")


# ----------------------------------------------------------------------------- describe


def describe(cfg, mesh_shape: tuple[int, int, int] | None = None,
             batch_size: int | None = None, preset: str | None = None) -> dict:
    """Parameter count and per-device memory of ``cfg`` (an ``ExperimentConfig``).

    Args:
      mesh_shape: ``(data, fsdp, model)`` sizes; default: the config's mesh with a -1 entry
        read as 1.
      batch_size: global batch; default ``cfg.train.batch_size``.
      preset: sharding preset; default ``cfg.mesh.preset``.
    Returns a dict of numbers (bytes are per device) — see the module docstring for the model.
    """
    if mesh_shape is None:
        mesh_shape = tuple(max(1, s) for s in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model))
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if len(mesh_shape) != 3 or any(s < 1 for s in mesh_shape):
        raise ValueError(f"mesh_shape must be three positive sizes (data, fsdp, model), got "
                         f"{mesh_shape}")
    preset = preset or cfg.mesh.preset
    batch = int(batch_size or cfg.train.batch_size)
    boxed = abstract_params(cfg)
    total, local = per_device_param_elements(boxed, mesh_shape, preset)
    data, fsdp, model = mesh_shape
    t = model if preset == "fsdp_tp" else 1
    # Activations live for one micro-batch at a time under gradient accumulation.
    local_batch = -(-batch // (data * fsdp * max(1, cfg.train.grad_accum_steps)))
    ema = cfg.train.ema_decay > 0
    out = {
        "name": cfg.name, "task": cfg.task, "params": int(total),
        "mesh": {"data": data, "fsdp": fsdp, "model": model}, "preset": preset,
        "devices": data * fsdp * model, "batch": batch, "local_batch": local_batch,
        "remat": getattr(model_config(cfg), "remat", "none"),
        "param_elements_per_device": int(local),
        "params_bytes": 4 * local,
        "opt_bytes": 8 * local,
        "ema_bytes": 4 * local if ema else 0,
        "grads_bytes": 4 * local,
        "activation_bytes": int(activation_bytes(cfg, local_batch, t)),
    }
    # what this machine runs (the layout above is the one asked for, not necessarily this)
    out["backend"] = sharding.describe_backend()
    out["state_bytes"] = out["params_bytes"] + out["opt_bytes"] + out["ema_bytes"]
    out["total_bytes"] = out["state_bytes"] + out["grads_bytes"] + out["activation_bytes"]
    return out


def format_table(d: dict) -> str:
    """A plain-text table of :func:`describe`'s result."""
    mesh = d["mesh"]
    rows = [
        ("config", f"{d['name']} (task {d['task']})"),
        ("parameters", f"{d['params']:,} ({d['params'] / 1e9:.3f} B)"),
        ("mesh", f"data={mesh['data']} fsdp={mesh['fsdp']} model={mesh['model']} "
                 f"({d['devices']} devices), preset {d['preset']}"),
        ("batch", f"{d['batch']} global, {d['local_batch']} per data×fsdp shard, "
                  f"remat {d['remat']}"),
        ("params / device", _gib(d["params_bytes"])),
        ("AdamW moments / device", _gib(d["opt_bytes"])),
        ("EMA / device", _gib(d["ema_bytes"])),
        ("train state / device", _gib(d["state_bytes"])),
        ("gradients / device", _gib(d["grads_bytes"])),
        ("activations / device (est.)", _gib(d["activation_bytes"])),
        ("total / device (est.)", _gib(d["total_bytes"])),
    ]
    if "backend" in d:
        rows.append(("this machine runs", d["backend"]))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _gib(n: int) -> str:
    return f"{n / GiB:9.3f} GiB"
