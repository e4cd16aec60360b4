"""Metrics: Fréchet distance against closed forms and a direct sqrtm, streaming statistics,
CLIP score, diversity, the judge wrapper and every bad input's message."""

import jax
import numpy as np
import pytest
import scipy.linalg

from unclip_jax.core import shapes
from unclip_jax.models.clip import CLIP
from unclip_jax.train.eval import metrics as M

# ---------------------------------------------------------------------------- Fréchet distance


def _direct_fd(mu1, s1, mu2, s2):
    """The pytorch-fid formula with a general (non-symmetric) matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = M.frechet_distance_from_moments(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-10)
    # same variances: only the means differ
    assert M.frechet_distance_from_moments(mu1, np.diag(v1), mu2, np.diag(v1)) == pytest.approx(
        np.sum((mu1 - mu2) ** 2), rel=1e-10)


def test_fd_matches_direct_full_matrix_computation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    b = rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    got = M.frechet_distance_from_moments(mu1, s1, mu2, s2)
    assert got == pytest.approx(_direct_fd(mu1, s1, mu2, s2), rel=1e-8)
    assert got == pytest.approx(M.frechet_distance_from_moments(mu2, s2, mu1, s1), rel=1e-8)


def test_fd_near_singular_and_identical_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 32))              # 10 samples in 32 dims: rank-9 covariance
    a = M.FeatureStats.of(x)
    assert np.linalg.matrix_rank(a.cov) == 9
    assert M.frechet_distance(a, M.FeatureStats.of(x)) == pytest.approx(0.0, abs=1e-9)
    y = rng.normal(size=(12, 32)) + 0.5
    fd = M.frechet_distance(a, M.FeatureStats.of(y))
    assert np.isfinite(fd) and fd > 32 * 0.25 * 0.9                 # ≥ ‖Δμ‖² roughly
    assert fd == pytest.approx(_direct_fd(a.mean, a.cov, y.mean(0), np.cov(y, rowvar=False)),
                               rel=1e-6)


def test_fd_of_few_features_equals_the_moments_route():
    """Fewer samples than dimensions: the Gram-matrix route equals FeatureStats' D × D one;
    more samples: it is the FeatureStats route."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 64)) * rng.uniform(0.5, 2.0, 64)
    y = rng.normal(size=(13, 64)) + 0.3
    want = M.frechet_distance(M.FeatureStats.of(x), M.FeatureStats.of(y))
    # (the D × D route adds sqrt of the ~1e-14 round-off eigenvalues of the null space)
    assert M.frechet_distance_of_features(x, y) == pytest.approx(want, rel=1e-7)
    assert M.frechet_distance_of_features(x, x) == pytest.approx(0.0, abs=1e-9)
    big_x, big_y = rng.normal(size=(40, 16)), rng.normal(size=(50, 16)) + 0.1
    assert M.frechet_distance_of_features(big_x, big_y) == M.frechet_distance(
        M.FeatureStats.of(big_x), M.FeatureStats.of(big_y))
    with pytest.raises(ValueError, match="one D"):
        M.frechet_distance_of_features(x, y[:, :32])


def test_streaming_stats_equal_one_shot():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(101, 5)) * [1, 2, 3, 4, 5] + 7.0
    one = M.FeatureStats.of(x)
    streamed = M.FeatureStats()
    for k in range(0, 101, 17):
        streamed.update(x[k:k + 17])
    merged = M.FeatureStats.of(x[:40]).merge(M.FeatureStats.of(x[40:]))
    for s in (streamed, merged):
        assert s.count == 101
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(one.cov, np.cov(x, rowvar=False), rtol=1e-9)
    assert M.frechet_distance(one, streamed) == pytest.approx(0.0, abs=1e-9)
    # rms pairwise distance: sqrt(mean over i != j of squared distances)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert one.rms_pairwise_distance() == pytest.approx(np.sqrt(d2.sum() / (101 * 100)))


def test_stats_save_load(tmp_path):
    x = np.random.default_rng(4).normal(size=(9, 3))
    s = M.FeatureStats.of(x)
    back = M.FeatureStats.load(s.save(tmp_path / "ref.npz"))
    assert back.count == 9 and back.dim == 3
    np.testing.assert_array_equal(back.cov, s.cov)


def test_fd_and_stats_bad_inputs():
    a = M.FeatureStats.of(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="feature dimension 5, these statistics have 4"):
        a.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="feature dimensions differ: 4 vs 6"):
        M.frechet_distance(a, M.FeatureStats.of(np.zeros((3, 6))))
    with pytest.raises(ValueError, match="at least 2 samples, these statistics have 1"):
        M.FeatureStats.of(np.zeros((1, 4))).cov
    with pytest.raises(ValueError, match="at least 2 samples, these statistics have 1"):
        M.frechet_distance(a, M.FeatureStats.of(np.ones((1, 4))))
    with pytest.raises(ValueError, match=r"must be \[N, D\], got shape \(4,\)"):
        a.update(np.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        a.update(np.full((2, 4), np.nan))
    with pytest.raises(TypeError, match="must be a FeatureStats, got ndarray"):
        M.frechet_distance(np.zeros((3, 4)), a)
    with pytest.raises(ValueError, match="mismatched shapes"):
        M.frechet_distance_from_moments(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="no samples"):
        M.FeatureStats().mean
    with pytest.raises(ValueError, match="different extractors"):
        a.merge(M.FeatureStats.of(np.zeros((2, 3))))


# ---------------------------------------------------------------------------- diversity


def test_diversity():
    same = np.tile([[1.0, 2.0, 3.0]], (7, 1))
    assert M.mean_pairwise_distance(same) == 0.0
    pts = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert M.mean_pairwise_distance(pts, block=1) == pytest.approx((5 + 4 + 3) / 3)
    x = np.random.default_rng(5).normal(size=(50, 4))
    full = np.mean([np.linalg.norm(x[i] - x[j]) for i in range(50) for j in range(i + 1, 50)])
    assert M.mean_pairwise_distance(x, block=7) == pytest.approx(full, rel=1e-10)
    sub = M.mean_pairwise_distance(x, max_samples=20, seed=1)
    assert sub != pytest.approx(full, rel=1e-10) and abs(sub - full) < 0.5 * full
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        M.mean_pairwise_distance(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="max_samples must be ≥ 2, got 1"):
        M.mean_pairwise_distance(x, max_samples=1)


# ---------------------------------------------------------------------------- CLIP score


class _ColourClip:
    """A toy 'CLIP' with known embeddings: an image's embedding is the one-hot of its nearest
    palette colour, a caption's the one-hot of its colour word (so cos is 1 or 0)."""

    def images(self, images):
        x = M.to_model_range(images)
        rgb = (x.reshape(len(x), -1, 3).mean(1) + 1) * 127.5
        pal = np.asarray(shapes.PALETTE, np.float64)
        return np.eye(len(pal))[np.argmin(((rgb[:, None] - pal[None]) ** 2).sum(-1), 1)]

    def texts(self, captions):
        return np.eye(len(shapes.COLOURS))[[next(i for i, c in enumerate(shapes.COLOURS)
                                                  if c in t.split()) for t in captions]]


def test_clip_score_own_vs_wrong_caption():
    imgs = np.stack([np.full((4, 4, 3), shapes.PALETTE[shapes.COLOURS.index(c)], np.uint8)
                     for c in ("red", "green")])
    clip = _ColourClip()
    assert M.clip_score(clip, imgs, ["a big red square", "a small green circle"]) == 100.0
    assert M.clip_score(clip, imgs, ["a big green square", "a small red circle"]) == 0.0
    # negative cosines are clipped at 0, positive ones scaled by 100
    s = M.clip_scores(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[-1.0, 0.0], [3.0, 3.0]]))
    np.testing.assert_allclose(s, [0.0, 100 / np.sqrt(2)])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        M.clip_score(clip, imgs, ["a red circle"])
    with pytest.raises(ValueError, match=r"paired \[N, E\] arrays, got \(2, 2\) and \(2, 3\)"):
        M.clip_scores(np.zeros((2, 2)), np.zeros((2, 3)))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_params, shapes_tokenizer):
    cfg, params = tiny_clip_params
    return M.ClipFeatures(cfg, params, shapes_tokenizer, batch_size=4)


def test_clip_features_batched_jit_equals_direct(tiny_clip):
    scenes = [shapes.sample_scene(1, i) for i in range(6)]
    imgs = np.stack([shapes.render(s, 16) for s in scenes])         # resized 16 → 8 inside
    caps = [shapes.caption(s) for s in scenes]
    emb = tiny_clip.images(imgs)
    assert emb.shape == (6, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    x = jax.image.resize(imgs.astype(np.float32) / 127.5 - 1, (6, 8, 8, 3), "linear")
    direct = CLIP(tiny_clip.cfg).apply({"params": tiny_clip.params}, x, method="encode_image")
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    assert tiny_clip.image_fn._cache_size() == 1        # 6 rows in padded batches of 4
    t = tiny_clip.texts(caps)
    want = np.mean(M.clip_scores(emb, t))
    assert M.clip_score(tiny_clip, imgs, caps) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"must be \[N, H, W, 3\], got shape \(6, 16, 16\)"):
        tiny_clip.images(imgs[..., 0])


# ---------------------------------------------------------------------------- judge


def test_judge_scores_on_renders_and_wrong_prompts():
    scenes = [shapes.sample_scene(2, i, "test", num_objects=k) for k in (1, 2) for i in range(6)]
    imgs = np.stack([shapes.render(s, 64) for s in scenes])
    prompts = [shapes.caption(s) for s in scenes]
    good = M.judge_scores(imgs, prompts)
    assert (good["num_single"], good["num_two"], good["resolution"]) == (6, 6, 64)
    assert good["single_colour_shape"] >= 5 / 6 and good["two_both_colour_shape"] >= 4 / 6
    bad = M.judge_scores(imgs[::-1], prompts)           # images paired with the wrong prompts
    assert bad["single_colour_shape"] < good["single_colour_shape"]
    only_single = M.judge_scores(imgs[:6], prompts[:6])
    assert only_single["relation"] is None and only_single["two_both_colour_shape"] is None
    with pytest.raises(ValueError, match="12 images but 11 prompts"):
        M.judge_scores(imgs, prompts[:-1])
    with pytest.raises(ValueError, match="uint8"):
        M.judge_scores(imgs.astype(np.float32), prompts)
