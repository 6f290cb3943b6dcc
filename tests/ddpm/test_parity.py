"""Parity with an independent PyTorch re-implementation of the original UNet and samplers (fp32, <= 1e-4).

The reference (tests/torch_reference.py) is written without the original's code; its weights reach our model only
through an original-format ``.pth`` and :func:`load_seed_ddpm_checkpoint`, so these tests cover the
converter too.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from sfd_jax.ddpm import diffusion  # noqa: E402
from sfd_jax.convert import load_seed_ddpm_checkpoint  # noqa: E402
from sfd_jax.models.ddpm_unet import ConditionalUNet  # noqa: E402
from tests.conftest import load_config  # noqa: E402
from tests.torch_reference import (RefConditionalModel, ref_alphas_cumprod, ref_ddim, ref_ddpm,  # noqa: E402
                                   ref_get_beta_schedule, ref_one_step, ref_seq)

ATOL = 1e-4


def assert_close(got, want):
    """max |got - want| <= 1e-4, scaled by the output's magnitude where that exceeds 1.

    A random-weight network is no denoiser: multi-step trajectories leave the data range (|x| ~ 10^2), and
    fp32 rounding then scales with them. Relative to the output, the bound is the same 1e-4.
    """
    got, want = np.asarray(got), np.asarray(want)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= ATOL * scale, f"max abs error {err:.3g} > {ATOL} x {scale:.3g}"


def ref_model_for(cfg, seed=0):
    """A reference model with the config's architecture and perturbed weights (GN scale/bias not 1/0)."""
    torch.manual_seed(seed)
    m, d = cfg.model, cfg.data
    ref = RefConditionalModel(ch=m.ch, out_ch=m.out_ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
                              attn_resolutions=m.attn_resolutions, dropout=m.dropout, in_channels=m.in_channels,
                              resolution=d.image_size, n_classes=d.n_classes, resamp_with_conv=m.resamp_with_conv)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("tiny_test")
    ref = ref_model_for(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pth"
    sd = ref.state_dict()
    torch.save([sd, None, 1000, sd], path)   # the pretrained layout [model, opt, step, ema]
    params = load_seed_ddpm_checkpoint(path)["ema"]
    model = ConditionalUNet.from_config(cfg)
    betas = ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)
    return cfg, ref, model, params, betas


def test_eps_matches_reference(setup):
    cfg, ref, model, params, _ = setup
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16, 16, 3)).astype(np.float32)
    t = np.array([0, 1, 37.5, 440, 711, 999], np.float32)
    c = np.array([0, 1, 2, 5, 8, 9])
    drop = np.array([False, True, False, True, False, False])
    want = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(c), "train",
               cond_drop_mask=torch.from_numpy(drop))
    got = model.apply({"params": params}, x, t, c, drop_mask=drop)
    assert np.abs(np.asarray(got) - nhwc(want)).max() <= ATOL


@pytest.mark.parametrize("cond_scale", [0.0, 2.0])
def test_one_step_samples_match_reference(setup, cond_scale):
    cfg, ref, model, params, betas = setup
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    c = np.array([0, 3, 7, 9])
    ac_ref = ref_alphas_cumprod(betas)
    want = ref_one_step(ref, nchw(z), torch.from_numpy(c), 440, ac_ref, cond_scale)
    _, ac = diffusion.schedule_from_config(cfg)
    np.testing.assert_array_equal(ac, ac_ref.numpy())
    eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, jnp.asarray(c), cond_scale)
    got = diffusion.generator_sample(eps_fn, jnp.asarray(z), 440, ac)
    assert np.abs(np.asarray(got) - nhwc(want.detach())).max() <= ATOL


@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_ddim_10_steps_with_guidance_match_reference(setup, skip):
    cfg, ref, model, params, betas = setup
    rng = np.random.default_rng(2)
    x_T = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    c = np.array([1, 2, 3, 4])
    seq = ref_seq(skip, 10, 1000)
    np.testing.assert_array_equal(diffusion.timestep_sequence(skip, 10, 1000), seq)
    want = ref_ddim(ref, nchw(x_T), torch.from_numpy(c), seq, torch.from_numpy(betas).float(), 0.0, 2.0)
    _, ac = diffusion.schedule_from_config(cfg)
    eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, jnp.asarray(c), 2.0)
    got = diffusion.ddim_sample(eps_fn, jnp.asarray(x_T), np.asarray(seq), ac, eta=0.0, rng=jax.random.key(0))
    assert_close(got, nhwc(want))


def test_ddpm_final_step_matches_reference(setup):
    """The ancestral step at t = 0 draws no noise, so a one-step schedule is deterministic and comparable."""
    cfg, ref, model, params, betas = setup
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32) * 0.1
    c = np.array([4, 5, 6])
    want = ref_ddpm(ref, nchw(x), torch.from_numpy(c), [0], torch.from_numpy(betas).float(), 1.0)
    _, ac = diffusion.schedule_from_config(cfg)
    eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, jnp.asarray(c), 1.0)
    got = diffusion.ddpm_sample(eps_fn, jnp.asarray(x), np.array([0]), ac, rng=jax.random.key(0))
    assert_close(got, nhwc(want))


def test_full_size_cifar10_eps_matches_reference(tmp_path):
    """The real CIFAR-10 architecture (38.6M parameters), one forward pass."""
    cfg = load_config("cifar10_sfd")
    ref = ref_model_for(cfg, seed=1)
    path = tmp_path / "cifar.pth"
    torch.save([ref.state_dict(), None, 5, ref.state_dict()], path)
    params = load_seed_ddpm_checkpoint(path)["model"]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    t, c = np.array([440.0, 38.0], np.float32), np.array([0, 9])
    with torch.no_grad():
        want = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(c), "test", cond_scale=0.0)
    got = ConditionalUNet.from_config(cfg).apply({"params": params}, x, t, c)
    assert np.abs(np.asarray(got) - nhwc(want)).max() <= ATOL


@pytest.mark.parametrize("layout, sampler, extra", [
    ("distilled", "one_step", ["--cond_scale=2"]),
    ("pretrained", "ddim", ["--steps=10", "--eta=0", "--cond_scale=2"]),
])
def test_sample_cli_replays_reference_outputs(tmp_path, layout, sampler, extra):
    """`python -m sfd_jax.sample` on an original .pth with replayed noise/labels reproduces the reference."""
    from tests.conftest import run_cli
    cfg = load_config("tiny_test")
    ref = ref_model_for(cfg, seed=3)
    sd = ref.state_dict()
    ckpt = tmp_path / "ckpt.pth"
    torch.save([sd, None, sd, None, 4999, sd] if layout == "distilled" else [sd, None, 10, sd], ckpt)
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((5, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 2, 4, 6, 9])
    np.save(tmp_path / "noise.npy", noise)
    np.save(tmp_path / "labels.npy", labels)
    out = tmp_path / "s.npz"
    run_cli("sfd_jax.sample", f"--checkpoint={ckpt}", "--config=tests/configs/tiny_test.py", f"--sampler={sampler}",
            f"--noise={tmp_path / 'noise.npy'}", f"--labels={tmp_path / 'labels.npy'}", f"--out={out}",
            "--batch=4", *extra, check=True)
    got = np.load(out)
    np.testing.assert_array_equal(got["labels"], labels)
    betas = ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)
    c = torch.from_numpy(labels)
    if sampler == "one_step":
        want = ref_one_step(ref, nchw(noise), c, 440, ref_alphas_cumprod(betas), 2.0).detach()
    else:
        want = ref_ddim(ref, nchw(noise), c, ref_seq("uniform", 10, 1000), torch.from_numpy(betas).float(), 0.0, 2.0)
    assert_close(got["images"], nhwc(want))
