"""SD schedule math against diffusers' schedulers: bit-identical ā, add_noise, v-prediction, DDIM steps."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.sd import scheduler as S


def test_sd15_schedule_constants():
    ac = S.SDSchedule().alphas_cumprod
    assert ac.dtype == np.float32 and ac.shape == (1000,)
    assert ac[625] == pytest.approx(0.137769, abs=5e-7)
    assert np.sqrt(ac[625]) == pytest.approx(0.371172, abs=5e-7)
    assert ac[20] == pytest.approx(0.981314, abs=5e-7)
    assert ac[979] == pytest.approx(0.005913, abs=5e-7)


def test_v_prediction_round_trip():
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    ac = S.SDSchedule().alphas_cumprod
    t = np.array([20, 625, 979])
    x_t = S.add_noise(x0, noise, t, ac)
    v = S.get_velocity(x0, noise, t, ac)
    assert np.allclose(S.pred_original_sample(v, x_t, t, ac, "v_prediction"), x0, atol=1e-5)
    assert np.allclose(S.pred_epsilon(v, x_t, t, ac, "v_prediction"), noise, atol=1e-5)
    assert np.allclose(S.pred_original_sample(noise, x_t, t, ac, "epsilon"), x0, atol=1e-4)


def test_guidance_convention():
    u, c = jnp.ones(3), jnp.full(3, 3.0)
    assert np.allclose(S.guided(u, c, 1.0), c) and np.allclose(S.guided(u, c, 7.5), 1 + 7.5 * 2)


torch_tests = pytest.mark.torch


@torch_tests
def test_alphas_cumprod_bit_identical_to_diffusers_ddpm_scheduler():
    pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = S.SDSchedule()
    assert np.array_equal(ours.betas, ref.betas.numpy())
    assert np.array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@torch_tests
def test_add_noise_and_velocity_match_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction")
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    t = np.array([100, 625])
    ac = S.SDSchedule().alphas_cumprod
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    back = lambda a: a.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    tt = torch.from_numpy(t)
    assert np.allclose(S.add_noise(x0, noise, t, ac), back(ref.add_noise(nchw(x0), nchw(noise), tt)), atol=1e-6)
    assert np.allclose(S.get_velocity(x0, noise, t, ac), back(ref.get_velocity(nchw(x0), nchw(noise), tt)),
                       atol=1e-6)


@torch_tests
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_steps_match_diffusers_ddim_scheduler(prediction_type, spacing):
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type, timestep_spacing=spacing)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(10)
    ours = S.SDSchedule.from_config(cfg)
    ts = ours.ddim_timesteps(10)
    assert np.array_equal(ts, ref.timesteps.numpy())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    x_ref = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    stride = ours.num_train_timesteps // 10
    for t in ts:
        out = rng.standard_normal(x.shape).astype(np.float32)
        step = ref.step(torch.from_numpy(out.transpose(0, 3, 1, 2).copy()), int(t), x_ref)
        x_ref = step.prev_sample
        x, x0 = S.ddim_step(out, np.array([t]), np.array([t - stride]), x, ours.alphas_cumprod,
                            ours.final_alpha_cumprod, prediction_type)
        assert np.allclose(np.asarray(x), x_ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)
        assert np.allclose(np.asarray(x0), step.pred_original_sample.numpy().transpose(0, 2, 3, 1), atol=1e-5)
