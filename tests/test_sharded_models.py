"""Every model: train steps on a data=2, fsdp=2, model=2 mesh == the single-device steps.

For the prior, AR prior, decoder, upsampler, dVAE and DALL·E (CLIP has its own test in
``test_train_clip.py``): a tiny config, two updates through the real ``loop.train_step`` with
the state shardings ``loop.state_layout`` derives from the logical axes (preset
``fsdp_tp``), on 8 fake CPU devices and on one device; losses, updated params and EMA agree
to 1e-5 relative (float32), and the params are really split (per-device bytes = total / 4
for leaves over fsdp × model, at least one leaf per model over "model"). The losses are the
models' real training losses with their random draws (t, noise, dropout, crops, Gumbel
noise): keys are the same on both runs and JAX's partitionable threefry draws the same values
whatever the sharding.

Last, the unCLIP text → image pipeline jitted with explicit in/out shardings (params by their
logical axes, the batch over data × fsdp) gives the unsharded images.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.core import config as config_lib
from unclip_jax.core import sharding
from unclip_jax.data import input_pipeline
from unclip_jax.models import dalle, dvae, prior, prior_ar
from unclip_jax.models import decoder as D
from unclip_jax.core.sharding import MeshConfig
from unclip_jax.train import loop
from unclip_jax.train.optim import make_optimizer

B, STEPS = 8, 2
SHARDED = MeshConfig(data=2, fsdp=2, model=2)
SINGLE = MeshConfig(data=1, fsdp=1, model=1)
# eps ≫ float noise: Adam's first steps are ≈ lr·sign(g), which would blow the reduction-order
# noise on an exactly-zero gradient up to a full update (see test_grad_accum.py).
OPTIM = config_lib.OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant",
                               eps=1e-3)


def _rng(seed):
    return np.random.default_rng(seed)


def _tokens(rng, n, length, vocab, lo=1):
    t = rng.integers(lo, vocab, (n, length))
    t[:, length // 2:] *= rng.integers(0, 2, (n, 1))          # some rows padded (id 0)
    return t.astype(np.int32)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- the models


def prior_case():
    cfg = prior.PriorConfig(embed_dim=8, text_width=16, context_length=6, width=32, depth=2,
                            num_heads=4, num_timesteps=100, scan_layers=True)
    model = prior.DiffusionPrior(cfg)
    schedule = prior.base_schedule(cfg)

    def batch(i):
        r = _rng(i)
        return {"image_emb": _unit(r.normal(size=(B, 8))), "text_emb": _unit(r.normal(size=(B, 8))),
                "text_states": r.normal(size=(B, 6, 16)).astype(np.float32),
                "text_tokens": _tokens(r, B, 6, 30)}

    init = lambda rng, b: model.init(rng, jnp.zeros(b["image_emb"].shape),  # noqa: E731
                                     jnp.zeros((b["image_emb"].shape[0],), jnp.int32),
                                     prior.condition(cfg, b))
    loss = lambda p, b, rng: prior.loss_fn(model, p, b, rng, schedule=schedule)  # noqa: E731
    return init, loss, batch


def prior_ar_case():
    cfg = prior_ar.ARPriorConfig(embed_dim=8, text_length=6, text_width=16, pca_dims=6,
                                 num_buckets=16, sim_buckets=4, width=32, depth=2, num_heads=4,
                                 caption_dropout=0.25, scan_layers=True)
    model = prior_ar.ARPrior(cfg)

    def batch(i):
        r = _rng(i)
        tokens = r.integers(0, 16, (B, 7))
        tokens[:, 0] = 16 + r.integers(0, 4, B)
        return {"tokens": tokens.astype(np.int32),
                "text_states": r.normal(size=(B, 6, 16)).astype(np.float32),
                "text_tokens": _tokens(r, B, 6, 30), "text_emb": _unit(r.normal(size=(B, 8)))}

    init = lambda rng, b: model.init(rng, b["tokens"], prior_ar.cond_inputs(b))  # noqa: E731
    loss = lambda p, b, rng: prior_ar.loss_fn(model, p, b, rng)  # noqa: E731
    return init, loss, batch


def decoder_case():
    cfg = D.DecoderConfig(image_size=8, clip_dim=8, clip_image_size=8, base_channels=16,
                          channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
                          head_channels=8, text_layers=1, text_width=16, text_heads=2,
                          vocab_size=32, context_length=6, num_timesteps=100, dropout=0.1)

    def batch(i):
        r = _rng(i)
        return {"image": r.uniform(-1, 1, (B, 8, 8, 3)).astype(np.float32),
                "image_emb": _unit(r.normal(size=(B, 8))), "tokens": _tokens(r, B, 6, 32)}

    init = lambda rng, b: D.init_decoder(cfg, rng, 1)  # noqa: E731
    loss = lambda p, b, rng: D.decoder_loss(p, cfg, b["image"], b["image_emb"],  # noqa: E731
                                            b["tokens"], rng)
    return init, loss, batch


def upsampler_case():
    cfg = D.UpsamplerConfig(image_size=16, low_res_size=8, base_channels=16,
                            channel_mult=(1,), num_res_blocks=1, crop_fraction=0.5,
                            num_timesteps=100, learned_variance=True)

    def batch(i):
        return {"image": _rng(i).uniform(-1, 1, (B, 16, 16, 3)).astype(np.float32)}

    init = lambda rng, b: D.init_upsampler(cfg, rng, 1)  # noqa: E731
    loss = lambda p, b, rng: D.upsampler_loss(p, cfg, b["image"], rng)  # noqa: E731
    return init, loss, batch


def dvae_case():
    # τ keeps its default slow schedule (≈ 1 here): annealed to 1/16, the Gumbel softmax turns
    # the float noise of differently-ordered reductions into different relaxed codes.
    cfg = dvae.DVAEConfig(image_size=8, num_groups=2, blocks_per_group=1, encoder_width=16,
                          decoder_width=16, decoder_init_width=8, vocab_size=32,
                          beta_steps=10)
    model = dvae.DVAE(cfg)

    def batch(i):
        return dvae.with_step(i, {"image": _rng(i).uniform(-1, 1, (B, 8, 8, 3))})

    init = lambda rng, b: model.init(rng, b["image"])  # noqa: E731
    loss = lambda p, b, rng: dvae.loss_fn(model, p, b, rng)  # noqa: E731
    return init, loss, batch


def dalle_case():
    cfg = dalle.DalleConfig(text_vocab_size=32, image_vocab_size=32, text_length=6,
                            grid_size=2, width=32, depth=2, num_heads=4, caption_dropout=0.25,
                            scan_layers=True)
    model = dalle.DalleTransformer(cfg)

    def batch(i):
        r = _rng(i)
        return {"text": _tokens(r, B, 6, 32),
                "image_tokens": r.integers(0, 32, (B, 4)).astype(np.int32)}

    init = lambda rng, b: model.init(  # noqa: E731
        rng, dalle.stream(cfg, b["text"], b["image_tokens"])[:, :-1])
    loss = lambda p, b, rng: dalle.loss_fn(model, p, b, rng)  # noqa: E731
    return init, loss, batch


CASES = {"prior": prior_case, "prior_ar": prior_ar_case, "decoder": decoder_case,
         "upsampler": upsampler_case, "dvae": dvae_case, "dalle": dalle_case}


def run_steps(init, loss, batch, mesh_cfg: MeshConfig):
    """``STEPS`` updates as ``loop.train`` runs them: state shardings from the logical axes,
    ``jit(init, out_shardings)``, ``jit(train_step)`` with in/out shardings and donation."""
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.logical_rules("fsdp_tp")
    cfg = config_lib.ExperimentConfig(
        name="sharded", model=None, optim=OPTIM,
        train=config_lib.TrainConfig(batch_size=B, steps=STEPS, ema_decay=0.5))
    tx = make_optimizer(OPTIM, STEPS)
    task = loop.Task(init=init, loss=loss, batches=None, example=batch(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        make_state, rng, _, state_sh = loop.state_layout(cfg, task, tx, mesh, rules)
        state = jax.jit(lambda r: nn.meta.unbox(make_state(r)), out_shardings=state_sh)(rng)
        batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, np.ndim(x)), batch(0))
        step = jax.jit(functools.partial(loop.train_step, loss_fn=loss, tx=tx, ema_decay=0.5),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                       donate_argnums=0)
        losses = []
        for i in range(STEPS):
            state, metrics = step(state, sharding.shard_batch(batch(i + 1), mesh))
            losses.append(float(metrics["loss"]))
            assert bool(metrics["finite"])
    return state, losses


# The convolutional models compile 2-3× longer (≈ 25-45 s of CPU each for the two runs on
# this machine); they run with ``make test-slow``. The transformer models run by default.
SLOW_CASES = ("decoder", "dvae", "upsampler")


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_CASES else name
    for name in sorted(CASES)])
def runs(request):
    init, loss, batch = CASES[request.param]()
    single = run_steps(init, loss, batch, SINGLE)
    sharded = run_steps(init, loss, batch, SHARDED)
    return request.param, single, sharded


def _assert_tree_close(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        # 1e-5 relative to the leaf's scale, floored at a typical weight scale (0.1), as in
        # test_train_clip.py: leaves with an exactly-zero gradient hold only float noise.
        scale = max(float(np.max(np.abs(x))), 0.1)
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * scale,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


# Models whose sharded steps are known to differ (none now). The dVAE was here: on the full
# data × fsdp × model mesh XLA's SPMD partitioner misplaced examples in the input gradient of
# its convs (see test_conv_block_gradients_sharded_equal_single_device below and
# benchmarks/repro_spmd_conv_batch_permute.py); sharding.gathered_kernel_conv works around it.
KNOWN_MISMATCH: dict[str, str] = {}


def test_sharded_steps_equal_single_device(runs):
    name, (single, loss_1), (sharded, loss_8) = runs
    try:
        _check_equal(name, single, loss_1, sharded, loss_8)
    except AssertionError:
        if name in KNOWN_MISMATCH:
            pytest.xfail(KNOWN_MISMATCH[name])
        raise
    assert name not in KNOWN_MISMATCH, f"{name} now matches: drop it from KNOWN_MISMATCH"


def _check_equal(name, single, loss_1, sharded, loss_8):
    # 1e-5 relative to max(|loss|, 1): the dVAE's loss is a small difference of O(1) terms
    # (NLL per dim and β·KL), so its own relative error is not the meaningful scale.
    np.testing.assert_allclose(loss_8, loss_1, rtol=0,
                               atol=1e-5 * max(1.0, *np.abs(loss_1)), err_msg=name)
    p0, p1 = jax.device_get(single.params), jax.device_get(sharded.params)
    _assert_tree_close(p0, p1, f"{name} params")
    _assert_tree_close(jax.device_get(single.ema_params), jax.device_get(sharded.ema_params),
                       f"{name} ema")
    assert int(sharded.step) == STEPS and int(sharded.skipped) == 0


def test_params_are_really_sharded(runs):
    name, _, (sharded, _) = runs
    mesh_sizes = {"data": 2, "fsdp": 2, "model": 2}
    both_total = both_local = 0
    over_model = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.params)[0]:
        axes = [a for entry in leaf.sharding.spec if entry is not None
                for a in (entry if isinstance(entry, tuple) else (entry,))]
        ways = int(np.prod([mesh_sizes[a] for a in axes]))
        local = leaf.addressable_shards[0].data
        assert local.size * ways == leaf.size, (name, jax.tree_util.keystr(path), axes)
        if "model" in axes:
            over_model.append(jax.tree_util.keystr(path))
        if "fsdp" in axes and "model" in axes:
            both_total += leaf.nbytes
            both_local += local.nbytes
    assert over_model, f"{name}: no parameter is split over 'model'"
    assert both_total > 0 and both_local * 4 == both_total, name
    # The optimizer state follows the params (Adam's moments have the params' shardings).
    mu = [s for s in jax.tree.leaves(sharded.opt_state) if getattr(s, "ndim", 0) >= 2]
    assert any(len(m.sharding.device_set) == 8 and m.addressable_shards[0].data.size * 4
               == m.size for m in mu), name


# ----------------------------------------------------------------------------- convs


def _conv_block_grads(model, x, w, params, mesh_cfg):
    """Gradients (params, input) of ``sum(model(x) * w)``, jitted on ``mesh_cfg`` with the
    params split by their logical axes (``fsdp_tp``) and ``x`` over the batch axes."""
    loss = lambda p, x: jnp.sum(model.apply(p, x) * w)  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1))
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.logical_rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        p_sh = sharding.logical_shardings(boxed, mesh, rules)
        x_sh = sharding.batch_sharding(mesh, x.ndim)
        out = jax.jit(grad, in_shardings=(p_sh, x_sh), out_shardings=(p_sh, x_sh))(
            jax.device_put(params, p_sh), jax.device_put(x, x_sh))
    return jax.device_get(out)


def test_conv_block_gradients_sharded_equal_single_device():
    """The smallest piece of the dVAE that XLA miscompiled: a residual block of two 3×3 convs
    (kernels stored [.., fsdp, model]) at 4×4 pixels, 2 examples per batch shard. Without
    ``sharding.gathered_kernel_conv`` the input gradient of its second conv came out with
    batch shards 1 and 2 swapped (relative errors ≈ 1 in the first conv's kernel gradient
    and in the input gradient); with it, every gradient equals the one-device gradient."""
    r = _rng(0)
    model = dvae.ResBlock(32, (3, 3), post_gain=0.25)
    x = r.normal(size=(8, 4, 4, 8)).astype(np.float32)
    w = r.normal(size=(8, 4, 4, 32)).astype(np.float32)
    shapes = sharding.strip_boxes(jax.eval_shape(lambda: model.init(jax.random.key(0), x)))
    params = jax.tree.map(lambda a: (0.3 * r.normal(size=a.shape)).astype(np.float32), shapes)
    single = _conv_block_grads(model, x, w, params, SINGLE)
    sharded = _conv_block_grads(model, x, w, params, SHARDED)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(single)[0],
                            jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.max(np.abs(a))),
                                   err_msg=jax.tree_util.keystr(path))


def test_gathered_kernel_conv_is_the_plain_conv():
    """Outside a mesh the wrapper is ``lax.conv_general_dilated`` (the constraint is a no-op),
    and inside one the kernel reaches the conv with its ``conv_in`` (fsdp) shards gathered."""
    r = _rng(1)
    x = r.normal(size=(2, 5, 5, 4)).astype(np.float32)
    k = r.normal(size=(3, 3, 4, 6)).astype(np.float32)
    args = ((1, 1), "SAME")
    dn = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    fn = sharding.gathered_kernel_conv((None, None, None, "conv_out"))
    np.testing.assert_array_equal(fn(x, k, *args, **dn),
                                  jax.lax.conv_general_dilated(x, k, *args, **dn))
    mesh = sharding.make_mesh(SHARDED)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules("fsdp_tp")):
        text = jax.jit(lambda x, k: fn(x, k, *args, **dn)).lower(x, k).as_text()
    # The kernel's constraint: input channels whole, output channels over "model".
    assert '[{}, {}, {}, {"model"}]' in text, text


# ----------------------------------------------------------------------------- sampling


def test_unclip_pipeline_jitted_with_shardings_matches_unsharded():
    """The text → image chain jitted once with in/out shardings (params by logical axes,
    tokens and images over data × fsdp) == the plain jitted chain, and its output is split."""
    from tiny import TINY_CLIP
    from unclip_jax.models.clip import CLIP
    from unclip_jax.pipelines import unclip as U

    E, L = 8, 8
    clip_cfg = dataclasses.replace(TINY_CLIP, vocab_size=32, context_length=L, eos_id=2)
    prior_cfg = prior.PriorConfig(embed_dim=E, text_width=16, context_length=L, width=16,
                                  depth=1, num_heads=2, num_timesteps=50, sample_steps=2,
                                  num_candidates=2)
    dec_cfg = D.DecoderConfig(image_size=8, clip_dim=E, clip_image_size=8, base_channels=8,
                              channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
                              head_channels=8, num_timesteps=50, sample_steps=2)
    boxed = {
        "clip": jax.eval_shape(lambda: CLIP(clip_cfg).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, L), jnp.int32))),
        "prior": jax.eval_shape(lambda: prior.DiffusionPrior(prior_cfg).init(
            jax.random.key(1), jnp.zeros((1, E)), jnp.zeros((1,), jnp.int32),
            {"text_emb": jnp.zeros((1, E)), "text_states": jnp.zeros((1, L, 16)),
             "text_mask": jnp.ones((1, L), bool)})),
        "decoder": jax.eval_shape(lambda: D.init_decoder(dec_cfg, jax.random.key(2))),
    }
    boxed = {k: v["params"] for k, v in boxed.items()}
    r = _rng(0)
    # Random non-zero params (the default init zeroes output layers: a trivial chain).
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * r.normal(size=s.shape), jnp.float32),
                          sharding.strip_boxes(boxed))
    params["upsamplers"] = ()
    unclip = U.UnCLIP(clip_cfg, prior_cfg, dec_cfg, (), params)
    fn = U.make_text_to_image(unclip)
    tokens = np.zeros((8, L), np.int32)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 1, r.integers(3, 32, (8, 3)), 2
    guidance = (jnp.float32(2.0), jnp.float32(3.0))
    rng = jax.random.key(5)
    plain = np.asarray(fn(params, tokens, rng, guidance))

    mesh = sharding.make_mesh(SHARDED)
    rules = sharding.logical_rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        param_sh = sharding.logical_shardings(boxed, mesh, rules)
        param_sh["upsamplers"] = ()
        rep = sharding.replicated(mesh)
        sharded_fn = jax.jit(fn, in_shardings=(param_sh, sharding.batch_sharding(mesh, 2), rep,
                                               (rep, rep)),
                             out_shardings=sharding.batch_sharding(mesh, 4))
        out = sharded_fn(jax.device_put(params, param_sh), tokens, rng, guidance)
    assert out.sharding.spec[0] == sharding.BATCH_AXES and len(out.sharding.device_set) == 8
    assert any("model" in str(s.spec) for s in jax.tree.leaves(param_sh))
    assert np.abs(plain).max() > 0.05
    np.testing.assert_allclose(np.asarray(out), plain, atol=2e-4)


# ----------------------------------------------------------------------------- multi-host


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}),
    ({"UNCLIP_JAX_DISTRIBUTED": "1"}, {}),
    ({"UNCLIP_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"num_processes": 2, "process_id": 1}),
])
def test_distributed_initialisation_from_the_environment(monkeypatch, env, expected):
    calls = []
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "UNCLIP_JAX_DISTRIBUTED",
                "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    waits = []     # processes other than 0 first check that the coordinator answers
    monkeypatch.setattr(sharding, "wait_for_coordinator", lambda *a: waits.append(a))
    assert sharding.maybe_initialize_distributed() == (expected is not None)
    bounded = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 100}
    assert calls == ([] if expected is None else [{**bounded, **expected}])
    assert waits == ([("a:1", 300)] if env.get("JAX_PROCESS_ID") == "1" else [])


def test_distributed_environment_errors(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: None)
    monkeypatch.setenv("UNCLIP_JAX_DISTRIBUTED", "yes please")
    with pytest.raises(ValueError, match="accepted: 1 .* 0 .* or unset"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("UNCLIP_JAX_DISTRIBUTED", "1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="both JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        sharding.maybe_initialize_distributed()


def test_indivisible_dimension_is_replicated_not_an_error():
    """A U-Net's RGB input conv ``[3, 3, 3, C]``: conv_in → fsdp cannot split 3 channels."""
    mesh = sharding.make_mesh(SHARDED)
    rules = sharding.logical_rules("fsdp_tp")
    boxed = {"rgb": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.float32),
                                            (None, None, "conv_in", "conv_out")),
             "hidden": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
                                               (None, None, "conv_in", "conv_out"))}
    sh = sharding.logical_shardings(boxed, mesh, rules)
    assert tuple(sh["rgb"].spec) == (None, None, None, "model")
    assert tuple(sh["hidden"].spec) == (None, None, "fsdp", "model")


def test_ar_prior_batches_split_over_processes(monkeypatch):
    arrays = {"x": np.arange(40)}
    full = input_pipeline.EmbeddingBatches(arrays, 8, seed=3).batch(2)["x"]
    parts = []
    for p in range(2):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        parts.append(input_pipeline.EmbeddingBatches(arrays, 8, seed=3).batch(2)["x"])
    np.testing.assert_array_equal(np.concatenate(parts), full)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="batch size 8 does not split over 3 processes"):
        input_pipeline.EmbeddingBatches(arrays, 8).batch(0)
