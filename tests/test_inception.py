"""FID Inception-v3: random-weight forward shape, the all-or-nothing state-dict loader
(round trip through .npz, failures listing bad keys), and a parity test against a
torch.nn.functional statement of the same network on the same weights."""

import numpy as np
import pytest

from unclip_jax.pipelines.convert import inception as CI
from unclip_jax.train.eval import inception as I

SIZE = 75            # the smallest input the network takes (299 is the FID size; slow on CPU)


@pytest.fixture(scope="module")
def variables():
    return I.init_variables(0, SIZE)


def test_expected_keys_are_pytorch_fid_names():
    want = I.expected_shapes()
    assert len(want) == 94 * 5                 # 94 BasicConv2d: conv.weight + 4 BatchNorm keys
    assert want["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert want["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert want["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert want["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert want["Mixed_7c.branch_pool.bn.running_var"] == (192,)
    # 21.8 M parameters + BatchNorm statistics without the 1008-way fc
    assert sum(int(np.prod(s)) for s in want.values()) == 21_820_000


def test_random_weights_forward_and_npz_round_trip(variables, tmp_path):
    # a fresh jitted function: other files' tests (coco-fid) in this process share the cached one
    I.features_fn.cache_clear()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    feats = I.InceptionFeatures(variables, batch_size=2, size=SIZE)
    out = feats.images(images)
    assert out.shape == (3, I.FEATURE_DIM) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(out >= 0)             # mean of ReLU outputs

    sd = I.state_dict_from_variables(variables)
    sd["fc.weight"] = np.zeros((1008, 2048), np.float32)            # ignored extras
    sd["fc.bias"] = np.zeros((1008,), np.float32)
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
    np.savez(tmp_path / "w.npz", **sd)
    loaded = CI.load_variables(tmp_path / "w.npz")
    again = I.InceptionFeatures(loaded, batch_size=2, size=SIZE).images(images)
    np.testing.assert_array_equal(out, again)
    assert feats.fn._cache_size() == 1                 # the same jitted function, one compile


def test_bad_state_dicts_fail_listing_keys(variables, tmp_path):
    sd = I.state_dict_from_variables(variables)
    del sd["Mixed_6e.branch1x1.conv.weight"]
    sd["Mixed_5b.branch1x1.bn.running_mean"] = np.zeros(65, np.float32)
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ValueError) as e:
        I.variables_from_state_dict(sd)
    msg = str(e.value)
    assert "3 bad keys" in msg
    assert "missing: Mixed_6e.branch1x1.conv.weight (want (192, 768, 1, 1))" in msg
    assert "wrong shape: Mixed_5b.branch1x1.bn.running_mean is (65,), want (64,)" in msg
    assert "unexpected: AuxLogits.fc.weight (1000, 768)" in msg
    with pytest.raises(FileNotFoundError, match="no weights file"):
        CI.read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weights format '.h5'.*accepted: .pth"):
        CI.read_state_dict(tmp_path / "w.h5")
    with pytest.raises(ValueError, match="at least 75×75, got size=64"):
        I.InceptionFeatures(variables, size=64)


# ---------------------------------------------------------------------------- parity


def _torch_forward(sd, x):
    """The FID Inception-v3 written with torch.nn.functional from the architecture description
    (pytorch-fid's FIDInceptionA/C/E over torchvision's Inception-v3), NCHW."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

    def conv(name, h, stride=1, padding=0):
        h = F.conv2d(h, t[f"{name}.conv.weight"], stride=stride, padding=padding)
        h = F.batch_norm(h, t[f"{name}.bn.running_mean"], t[f"{name}.bn.running_var"],
                         t[f"{name}.bn.weight"], t[f"{name}.bn.bias"], False, 0.0, 1e-3)
        return F.relu(h)

    def avg(h):
        return F.avg_pool2d(h, 3, 1, 1, count_include_pad=False)

    def block_a(n, h):
        b5 = conv(f"{n}.branch5x5_2", conv(f"{n}.branch5x5_1", h), padding=2)
        bd = conv(f"{n}.branch3x3dbl_1", h)
        bd = conv(f"{n}.branch3x3dbl_3", conv(f"{n}.branch3x3dbl_2", bd, padding=1), padding=1)
        return torch.cat([conv(f"{n}.branch1x1", h), b5, bd, conv(f"{n}.branch_pool", avg(h))], 1)

    def block_c(n, h):
        r, c = (0, 3), (3, 0)
        b7 = conv(f"{n}.branch7x7_1", h)
        b7 = conv(f"{n}.branch7x7_3", conv(f"{n}.branch7x7_2", b7, padding=r), padding=c)
        bd = conv(f"{n}.branch7x7dbl_1", h)
        for i, p in zip(range(2, 6), (c, r, c, r)):
            bd = conv(f"{n}.branch7x7dbl_{i}", bd, padding=p)
        return torch.cat([conv(f"{n}.branch1x1", h), b7, bd, conv(f"{n}.branch_pool", avg(h))], 1)

    def block_e(n, h, pool):
        b3 = conv(f"{n}.branch3x3_1", h)
        b3 = torch.cat([conv(f"{n}.branch3x3_2a", b3, padding=(0, 1)),
                        conv(f"{n}.branch3x3_2b", b3, padding=(1, 0))], 1)
        bd = conv(f"{n}.branch3x3dbl_2", conv(f"{n}.branch3x3dbl_1", h), padding=1)
        bd = torch.cat([conv(f"{n}.branch3x3dbl_3a", bd, padding=(0, 1)),
                        conv(f"{n}.branch3x3dbl_3b", bd, padding=(1, 0))], 1)
        p = avg(h) if pool == "avg" else F.max_pool2d(h, 3, 1, 1)
        return torch.cat([conv(f"{n}.branch1x1", h), b3, bd, conv(f"{n}.branch_pool", p)], 1)

    h = conv("Conv2d_1a_3x3", x, stride=2)
    h = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", h), padding=1)
    h = F.max_pool2d(h, 3, 2)
    h = F.max_pool2d(conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", h)), 3, 2)
    for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        h = block_a(n, h)
    bd = conv("Mixed_6a.branch3x3dbl_2", conv("Mixed_6a.branch3x3dbl_1", h), padding=1)
    h = torch.cat([conv("Mixed_6a.branch3x3", h, stride=2),
                   conv("Mixed_6a.branch3x3dbl_3", bd, stride=2), F.max_pool2d(h, 3, 2)], 1)
    for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        h = block_c(n, h)
    b3 = conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", h), stride=2)
    b7 = conv("Mixed_7a.branch7x7x3_1", h)
    b7 = conv("Mixed_7a.branch7x7x3_2", b7, padding=(0, 3))
    b7 = conv("Mixed_7a.branch7x7x3_3", b7, padding=(3, 0))
    b7 = conv("Mixed_7a.branch7x7x3_4", b7, stride=2)
    h = torch.cat([b3, b7, F.max_pool2d(h, 3, 2)], 1)
    h = block_e("Mixed_7c", block_e("Mixed_7b", h, "avg"), "max")
    return F.adaptive_avg_pool2d(h, 1).flatten(1)


@pytest.mark.parity
def test_parity_with_torch_functional_on_random_weights():
    """Same random weights (BatchNorm statistics and scales randomised too, so the padding
    and pooling conventions matter), 40 px inputs resized to 99 px on both sides."""
    torch = pytest.importorskip("torch")
    import jax

    rng = np.random.default_rng(1)
    sd = {}
    for k, shape in I.expected_shapes().items():
        if k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif k.endswith("bn.weight"):
            sd[k] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif k.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            sd[k] = (0.1 * rng.normal(size=shape)).astype(np.float32)
    images = rng.integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    ours = I.InceptionFeatures(I.variables_from_state_dict(sd), batch_size=2,
                               size=99).images(images)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(99, 99), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        ref = _torch_forward(sd, 2 * x - 1).numpy()
    assert ref.shape == ours.shape == (2, 2048)
    assert jax.numpy.std(ref) > 1e-2                   # the features are not all vanishing
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
