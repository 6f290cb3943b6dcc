"""Diffusion math and samplers against closed forms (no torch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.ddpm import diffusion
from tests.conftest import load_config


@pytest.fixture(scope="module")
def ac():
    return diffusion.schedule_from_config(load_config("cifar10_sfd"))[1]


def test_alphas_cumprod_handy_values(ac):
    """The original's float32 ā for the linear 1e-4..0.02 schedule at a few t."""
    assert ac.dtype == np.float32 and ac.shape == (1000,)
    for t, want in [(38, 0.981507), (440, 0.137710), (711, 0.005871), (20, 0.993735)]:
        assert abs(float(ac[t]) - want) < 1e-6, t
    assert abs(float(ac[979]) - 6.02e-5) < 1e-7
    a, b, s = diffusion.one_step_coefficients(ac, 440)
    np.testing.assert_allclose([float(a), float(b), float(s)], [0.371093, 0.928596, 2.502326], atol=2e-6)


@pytest.mark.parametrize("kind", diffusion.BETA_SCHEDULES)
def test_beta_schedules(kind):
    b = diffusion.get_beta_schedule(kind, beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000)
    assert b.shape == (1000,) and b.dtype == np.float64 and (b > 0).all() and (b <= 1).all()
    if kind == "linear":
        assert b[0] == 1e-4 and b[-1] == 0.02
    if kind == "quad":
        np.testing.assert_allclose(np.sqrt(b[[0, -1]]), np.sqrt([1e-4, 0.02]))
    if kind == "jsd":
        assert b[0] == 1 / 1000 and b[-1] == 1.0
    if kind == "const":
        assert (b == 0.02).all()


def test_unknown_schedule_sampler_and_skip_are_errors(ac):
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion.get_beta_schedule("cosine", beta_start=0, beta_end=1, num_diffusion_timesteps=10)
    with pytest.raises(ValueError, match="sampler"):
        diffusion.run_sampler("euler", None, jnp.zeros((1, 2, 2, 1)), ac, rng=jax.random.key(0), t_init=1)
    with pytest.raises(ValueError, match="skip"):
        diffusion.timestep_sequence("log", 10, 1000)


def test_timestep_sequences():
    np.testing.assert_array_equal(diffusion.timestep_sequence("uniform", 10, 1000), np.arange(0, 1000, 100))
    q = diffusion.timestep_sequence("quad", 10, 1000)
    assert q[0] == 0 and q[-1] == 800 and len(q) == 10 and (np.diff(q) > 0).all()


def test_noise_and_x0_conversions_are_inverse(ac):
    k = jax.random.split(jax.random.key(0), 2)
    x0 = jax.random.uniform(k[0], (3, 4, 4, 2), minval=-1, maxval=1)
    eps = jax.random.normal(k[1], x0.shape)
    t = jnp.array([0, 440, 999])
    x_t = diffusion.add_noise(x0, t, eps, ac)
    a = jnp.asarray(ac)[t]
    np.testing.assert_allclose(diffusion.eps_to_x0(x_t, eps, a), x0, atol=3e-4)
    np.testing.assert_allclose(diffusion.x0_to_eps(x_t, x0, a), eps, atol=3e-4)


def test_guidance_convention():
    c, u = jnp.array([2.0]), jnp.array([1.0])
    assert float(diffusion.guided_eps(c, u, 0.0)[0]) == 2.0
    assert float(diffusion.guided_eps(c, u, 2.0)[0]) == 3 * 2.0 - 2 * 1.0


def _oracle(x0, ac):
    """An exact eps function for a known clean image x0."""
    ab = jnp.asarray(ac)

    def eps_fn(x_t, t):
        a = ab[t.astype(jnp.int32)].reshape(-1, 1, 1, 1)
        return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return eps_fn


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_samplers_with_an_exact_model_return_the_clean_image(ac, sampler, eta, skip):
    x0 = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-0.9, maxval=0.9)
    x_T = jax.random.normal(jax.random.key(2), x0.shape)
    out = diffusion.run_sampler(sampler, _oracle(x0, ac), x_T, ac, rng=jax.random.key(3), t_init=999, steps=20,
                                skip=skip, eta=eta or 0.0)
    np.testing.assert_allclose(out, x0, atol=1e-3)


def test_one_step_generator_map(ac):
    z = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
    eps_val = 0.3 * jnp.ones_like(z)
    out = diffusion.generator_sample(lambda x, t: eps_val, z, 440, ac)
    _, _, sigma = diffusion.one_step_coefficients(ac, 440)
    np.testing.assert_allclose(out, sigma * (z - eps_val), atol=1e-5)


def test_class_conditional_eps_fn_batches_guidance_as_two_passes():
    calls = []

    def apply_fn(variables, x, t, labels, drop_mask=None, train=False, rngs=None):
        calls.append(x.shape[0])
        keep = 1.0 if drop_mask is None else (~drop_mask).astype(jnp.float32).reshape(-1, 1, 1, 1)
        return x * 0 + keep * labels.reshape(-1, 1, 1, 1) + (1 - keep) * -1.0

    x = jnp.zeros((3, 2, 2, 1))
    labels = jnp.array([1.0, 2.0, 3.0])
    out = diffusion.class_conditional_eps_fn(apply_fn, None, labels, 0.5)(x, jnp.zeros(3))
    assert calls == [6]
    np.testing.assert_allclose(out[:, 0, 0, 0], 1.5 * labels - 0.5 * -1.0)
