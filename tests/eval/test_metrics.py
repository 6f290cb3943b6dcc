"""FID / IS / precision-recall math against closed forms, hand-computed values and independent references."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from sfd_jax.eval import metrics


def _closed_form_fid_diag(mu1, a, mu2, b):
    """FID of N(mu1, diag a) and N(mu2, diag b): |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def _fid_by_eigh(mu1, s1, mu2, s2):
    """Independent of sqrtm(S1 S2): tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_fid_matches_closed_form_for_gaussians_with_known_statistics():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))        # a common rotation keeps the closed form
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = _closed_form_fid_diag(mu1, a, mu2, b)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_an_independent_computation_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 32
    x1, x2 = rng.normal(size=(200, d)), rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    mu1, s1 = metrics.mean_cov(x1)
    mu2, s2 = metrics.mean_cov(x2)
    np.testing.assert_allclose(s1, np.cov(x1, rowvar=False))
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-7)
    assert metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ours, rel=1e-7)
    # and the textbook scipy formula
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([1.0, 0.5, 0.5, 3.0])
    mu2 = np.array([1.0, 0.0, -1.0, 0.0])
    x1 = rng.normal(size=(n, d)) * np.sqrt(a)
    x2 = rng.normal(size=(n, d)) * np.sqrt(b) + mu2
    fid = metrics.frechet_distance(*metrics.mean_cov(x1), *metrics.mean_cov(x2))
    assert fid == pytest.approx(_closed_form_fid_diag(np.zeros(d), a, mu2, b), abs=0.03)


def test_fid_survives_singular_covariances_with_the_eps_offset():
    rng = np.random.default_rng(3)
    d = 64
    x1, x2 = rng.normal(size=(10, d)), rng.normal(size=(12, d)) + 1.0     # rank < d: singular covariances
    mu1, s1 = metrics.mean_cov(x1)
    mu2, s2 = metrics.mean_cov(x2)
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fid)
    assert fid == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-3)
    assert metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(fid, rel=1e-3)


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimensions"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_on_hand_made_predictions():
    k = 5
    onehot = np.eye(k)[np.repeat(np.arange(k), 4)]                      # confident and diverse: IS = k
    assert metrics.inception_score(onehot, split_size=5000)[0] == pytest.approx(k)
    same = np.tile([0.1, 0.2, 0.3, 0.25, 0.15], (20, 1))                 # identical predictions: IS = 1
    assert metrics.inception_score(same)[0] == pytest.approx(1.0)
    # two splits: the first covers 2 classes (IS 2), the second 4 classes (IS 4): mean 3, std 1
    p = np.concatenate([np.eye(4)[[0, 1, 0, 1]], np.eye(4)[[0, 1, 2, 3]]])
    mean, std = metrics.inception_score(p, split_size=4)
    assert (mean, std) == (pytest.approx(3.0), pytest.approx(1.0))
    assert metrics.inception_score(p, n_splits=2) == (pytest.approx(3.0), pytest.approx(1.0))
    # a hand-computed soft case: p(y|x) = [0.75, 0.25] and [0.25, 0.75]; p(y) = [0.5, 0.5]
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    assert metrics.inception_score(np.array([[0.75, 0.25], [0.25, 0.75]]))[0] == pytest.approx(np.exp(kl))
    logits = np.log(np.array([[0.75, 0.25], [0.25, 0.75]])) + 7.0
    np.testing.assert_allclose(metrics.softmax(logits), [[0.75, 0.25], [0.25, 0.75]])


def _line(xs, d=4):
    f = np.zeros((len(xs), d), np.float32)
    f[:, 0] = xs
    return f


def test_precision_recall_on_a_constructed_point_set():
    real = _line(np.arange(10.0))                                 # radii^2 (k=3): 9, 4, ..., 4, 9
    fake = _line(np.array([0, 1, 2, 3, 4, 5, 1000, 1001, 1002, 1003.0]))
    np.testing.assert_allclose(metrics.manifold_radii(real), [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
    np.testing.assert_allclose(metrics.manifold_radii(fake), [9, 4, 4, 4, 4, 9, 9, 4, 4, 9])
    precision, recall = metrics.precision_recall(real, fake, k=3)
    # 6 of 10 fakes lie on real points; the cluster at 1000 is outside. Real 0..5 coincide with fakes, 6 and 7
    # are within fake 5's ball (radius^2 9), 8 is exactly on its boundary (distance^2 9: inside, '<='), 9 is not.
    assert precision == pytest.approx(0.6)
    assert recall == pytest.approx(0.9)


def test_precision_recall_match_brute_force_and_do_not_depend_on_blocks():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(150, 8)).astype(np.float32)
    fake = (rng.normal(size=(120, 8)) * 1.3 + 0.4).astype(np.float32)

    def brute(a, b, k=3):
        da = ((a[:, None] - a[None]) ** 2).sum(-1)
        ra = np.sort(da, 1)[:, k]
        db = ((b[:, None] - b[None]) ** 2).sum(-1)
        rb = np.sort(db, 1)[:, k]
        dab = ((a[:, None] - b[None]) ** 2).sum(-1)
        return (dab.T <= ra[None]).any(1).mean(), (dab <= rb[None]).any(1).mean()

    want = brute(real.astype(np.float64), fake.astype(np.float64))
    assert metrics.precision_recall(real, fake) == pytest.approx(want)
    assert metrics.precision_recall(real, fake, block=32) == pytest.approx(want)


def test_reference_statistics_round_trip_through_the_npz_cache(tmp_path):
    rng = np.random.default_rng(5)
    feats = {"pool3": rng.normal(size=(30, 6)), "spatial": rng.normal(size=(30, 5))}
    st = metrics.stats_from_features(feats, keep_features=True)
    st.save(str(tmp_path / "s.npz"))
    back = metrics.RefStats.load(str(tmp_path / "s.npz"))
    np.testing.assert_allclose(back.mu, feats["pool3"].mean(0))
    np.testing.assert_allclose(back.sigma_spatial, np.cov(feats["spatial"], rowvar=False))
    assert back.n == 30 and back.features.shape == (30, 6)


def test_resize_weights_pytorch_and_tf1_legacy():
    from sfd_jax.eval.inception import _interp_matrix, preprocess

    # pytorch align_corners=False, 2 -> 4: src = (dst + 0.5) / 2 - 0.5 = [-0.25 -> 0, 0.25, 0.75, 1.25 -> clamp]
    np.testing.assert_allclose(_interp_matrix(2, 4, "pytorch_fid"),
                               [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    # TF1 legacy (no half-pixel centres): src = dst * in / out = [0, 0.5, 1, 1.5]
    np.testing.assert_allclose(_interp_matrix(2, 4, "tf1"), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    x = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1) * np.ones((1, 299, 1, 1), np.uint8)
    x = np.repeat(x, 100, axis=2)[:, :, :299]
    tf1 = np.asarray(preprocess(x, "tf1"))
    np.testing.assert_allclose(tf1[0, 0, 0], [-1.0] * 3)                  # (0 - 128) / 128, grey -> RGB
    np.testing.assert_allclose(np.asarray(preprocess(x))[0, 0, 0], [-1.0] * 3)
    np.testing.assert_allclose(np.asarray(preprocess(x))[0, 0, -1], [1.0] * 3)  # 2 * 255/255 - 1
