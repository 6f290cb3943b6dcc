"""The SiD/SFD losses against the original's formulas, written again here in PyTorch (autograd)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.ddpm import diffusion
from sfd_jax.distill.losses import denoising_loss, sid_generator_loss
from tests.conftest import load_config

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

AC = diffusion.schedule_from_config(load_config("cifar10_sfd"))[1]


def _inputs(seed=0, b=4):
    r = np.random.default_rng(seed)
    return dict(x0=r.uniform(-1, 1, (b, 5, 5, 3)).astype(np.float32),
                noise=r.standard_normal((b, 5, 5, 3)).astype(np.float32),
                t=np.array([38, 200, 440, 711][:b]),
                wp=(r.standard_normal((3, 3)) * 0.7).astype(np.float32),
                ws=(r.standard_normal((3, 3)) * 0.7).astype(np.float32))


def jax_eps(w, bias):
    return lambda x, t: jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, w) + bias * t[:, None, None, None] / 1000.0)


def torch_eps(w, bias):
    w = torch.from_numpy(w)
    return lambda x, t: torch.tanh(torch.einsum("bhwc,cd->bhwd", x, w) + bias * t.view(-1, 1, 1, 1) / 1000.0)


def torch_sid(p, sg, x0, t, e, alpha, diffinst):
    """The original's SiD generator loss, per sample, in torch."""
    a = torch.from_numpy(AC)[t].view(-1, 1, 1, 1)
    aa, bb = a.sqrt(), (1 - a).sqrt()
    tf = t.float()
    if diffinst:
        with torch.no_grad():
            xt = aa * x0 + bb * e
            sg_x = (xt - bb * sg(xt, tf)) / aa
            p_x = (xt - bb * p(xt, tf)) / aa
    else:
        xt = aa * x0 + bb * e
        sg_x = (xt - bb * sg(xt, tf)) / aa
        p_x = (xt - bb * p(xt, tf)) / aa
    with torch.no_grad():
        w = (p_x - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    if diffinst or alpha == 1:
        loss = (p_x - sg_x) * (sg_x - x0) / w
    else:
        loss = (p_x - sg_x) * ((p_x - x0) - alpha * (p_x - sg_x)) / w
    return loss.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("alpha, diffinst", [(1.2, False), (1.0, False), (1.2, True)])
def test_sid_generator_loss_and_its_gradient_match_torch(alpha, diffinst):
    d = _inputs()
    p, s = jax_eps(d["wp"], 0.3), jax_eps(d["ws"], -0.2)

    def f(x0):
        return sid_generator_loss(p, s, x0, jnp.asarray(d["t"]), jnp.asarray(d["noise"]), AC, alpha, diffinst)

    got = f(jnp.asarray(d["x0"]))
    got_grad = jax.grad(lambda x: f(x).mean())(jnp.asarray(d["x0"]))

    x0 = torch.from_numpy(d["x0"]).requires_grad_(True)
    want = torch_sid(torch_eps(d["wp"], 0.3), torch_eps(d["ws"], -0.2), x0, torch.from_numpy(d["t"]),
                     torch.from_numpy(d["noise"]), alpha, diffinst)
    want.mean().backward()
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), x0.grad.numpy(), rtol=2e-5, atol=1e-6)


def test_gradient_flows_through_both_networks_inputs():
    """Freezing a network's *input* (not just its weights) changes the gradient: both paths are live."""
    d = _inputs(1)
    p, s = jax_eps(d["wp"], 0.3), jax_eps(d["ws"], -0.2)
    t, e = jnp.asarray(d["t"]), jnp.asarray(d["noise"])

    def grad_with(p_fn, s_fn):
        return jax.grad(lambda x: sid_generator_loss(p_fn, s_fn, x, t, e, AC, 1.2).mean())(jnp.asarray(d["x0"]))

    full = grad_with(p, s)
    frozen_p = grad_with(lambda x, tt: jax.lax.stop_gradient(p(x, tt)), s)
    frozen_s = grad_with(p, lambda x, tt: jax.lax.stop_gradient(s(x, tt)))
    assert np.abs(np.asarray(full - frozen_p)).max() > 1e-3
    assert np.abs(np.asarray(full - frozen_s)).max() > 1e-3


def test_omega_is_constant_for_the_gradient():
    """ℓ is linear in 1/ω with ω under stop_gradient: scaling the teacher's error must not add a d(ω) term."""
    d = _inputs(2)
    p, s = jax_eps(d["wp"], 0.3), jax_eps(d["ws"], -0.2)
    x0 = torch.from_numpy(d["x0"]).requires_grad_(True)
    want = torch_sid(torch_eps(d["wp"], 0.3), torch_eps(d["ws"], -0.2), x0, torch.from_numpy(d["t"]),
                     torch.from_numpy(d["noise"]), 1.2, False)
    # Differentiating through ω as well gives a different gradient: the test above would catch its omission.
    a = torch.from_numpy(AC)[torch.from_numpy(d["t"])].view(-1, 1, 1, 1)
    x0b = torch.from_numpy(d["x0"]).requires_grad_(True)
    xt = a.sqrt() * x0b + (1 - a).sqrt() * torch.from_numpy(d["noise"])
    tf = torch.from_numpy(d["t"]).float()
    pe, se = torch_eps(d["wp"], 0.3), torch_eps(d["ws"], -0.2)
    p_x, s_x = (xt - (1 - a).sqrt() * pe(xt, tf)) / a.sqrt(), (xt - (1 - a).sqrt() * se(xt, tf)) / a.sqrt()
    w = (p_x - x0b).abs().mean(dim=(1, 2, 3), keepdim=True)
    ((p_x - s_x) * ((p_x - x0b) - 1.2 * (p_x - s_x)) / w).sum(dim=(1, 2, 3)).mean().backward()
    want.mean().backward()
    assert (x0.grad - x0b.grad).abs().max() > 1e-4
    del p, s


def test_denoising_loss_matches_formula():
    d = _inputs(3)
    eps = jax_eps(d["wp"], 0.1)
    got = denoising_loss(eps, jnp.asarray(d["x0"]), jnp.asarray(d["t"]), jnp.asarray(d["noise"]), AC)
    a = AC[d["t"]].reshape(-1, 1, 1, 1)
    xt = np.sqrt(a) * d["x0"] + np.sqrt(1 - a) * d["noise"]
    out = np.tanh(np.einsum("bhwc,cd->bhwd", xt, d["wp"]) + 0.1 * d["t"].reshape(-1, 1, 1, 1) / 1000)
    np.testing.assert_allclose(np.asarray(got), ((d["noise"] - out) ** 2).sum(axis=(1, 2, 3)), rtol=1e-5)
