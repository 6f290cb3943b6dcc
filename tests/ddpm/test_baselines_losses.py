"""The baselines' losses against PyTorch re-implementations of the formulas (values and gradients, fp32).

Both sides use the same small stand-in for the UNet, ε(x, t, c) = s·tanh(x·a + emb[c or null] + (t/1000)·b), so
the tests check the losses' arithmetic (which terms, which means, which labels, where gradients stop), not the
network (the UNet's parity is tested elsewhere).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sfd_jax.ddpm import diffusion
from sfd_jax.ddpm.baselines import esd, sa, salun
from sfd_jax.ddpm.baselines.common import FisherState
from sfd_jax.distill.state import PretrainState, make_optimizer

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

N_CLASSES, H, C = 10, 4, 3


class StandIn:
    """The stand-in network with the ConditionalUNet's apply signature (drop_mask True = the null class)."""

    def apply(self, variables, x, t, labels, drop_mask=None, train=False, rngs=None):
        p = variables["params"]
        lab = labels if drop_mask is None else jnp.where(drop_mask, N_CLASSES, labels)
        h = x * p["a"] + jnp.asarray(p["emb"])[lab][:, None, None, :] + (t / 1000.0)[:, None, None, None] * p["b"]
        return p["s"] * jnp.tanh(h)


def torch_eps(p, x, t, labels, drop=None):
    lab = labels if drop is None else torch.where(drop, torch.full_like(labels, N_CLASSES), labels)
    h = x * p["a"] + p["emb"][lab][:, None, None, :] + (t.float() / 1000.0)[:, None, None, None] * p["b"]
    return p["s"] * torch.tanh(h)


def params(seed=0):
    r = np.random.default_rng(seed)
    return {"a": r.normal(size=C).astype(np.float32), "b": r.normal(size=C).astype(np.float32),
            "emb": r.normal(size=(N_CLASSES + 1, C)).astype(np.float32), "s": np.float32(0.7)}


def to_torch(p):
    return {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in p.items()}


def abar():
    return diffusion.schedule_from_config(ml_collections.ConfigDict(dict(diffusion=dict(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000))))[1]


def noise_loss_torch(p, x0, labels, t, e, ac, drop=None):
    """sum_CHW (e − ε(√ā x0 + √(1−ā) e, t, c))², per sample."""
    a = torch.tensor(ac)[t].view(-1, 1, 1, 1)
    x_t = x0 * a.sqrt() + e * (1.0 - a).sqrt()
    return (e - torch_eps(p, x_t, t, labels, drop)).square().sum(dim=(1, 2, 3))


def compare(jax_val, jax_grads, t_val, t_params, rtol=1e-5):
    np.testing.assert_allclose(float(jax_val), float(t_val.detach()), rtol=rtol)
    t_val.backward()
    for k, v in t_params.items():
        np.testing.assert_allclose(np.asarray(jax_grads[k]), v.grad.numpy(), rtol=rtol, atol=1e-6, err_msg=k)


def data(seed, n):
    r = np.random.default_rng(seed)
    return (r.uniform(-1, 1, (n, H, H, C)).astype(np.float32), r.integers(0, N_CLASSES, n).astype(np.int32),
            r.integers(0, 1000, n).astype(np.int32), r.normal(size=(n, H, H, C)).astype(np.float32))


def test_selective_amnesia_loss_matches_torch():
    p, anchor, ac = params(0), params(1), abar()
    fisher = {k: np.abs(np.asarray(v)) for k, v in params(2).items()}
    x, labels, t, e = data(3, 6)
    gamma, lmbda, nf = 0.7, 3.0, 2

    def f(q):
        return sa.sa_loss(StandIn(), q, anchor, fisher, x, labels, t, e, ac, n_forget=nf, gamma=gamma, lmbda=lmbda)[0]
    val, grads = jax.jit(jax.value_and_grad(f))(p)
    tp = to_torch(p)
    per = noise_loss_torch(tp, torch.tensor(x), torch.tensor(labels).long(), torch.tensor(t).long(),
                           torch.tensor(e), ac)
    ewc = sum((torch.tensor(fisher[k]) * (tp[k] - torch.tensor(anchor[k])).square()).sum() for k in tp)
    compare(val, grads, per[:nf].mean() + gamma * per[nf:].mean() + lmbda * ewc, tp)


def test_fisher_is_the_squared_gradient_of_the_loss_summed_over_timesteps():
    """Two chunks of timesteps per sample, one per step: acc = Σ_samples weight·(Σ_chunks ∇ Σ_t 250·ℓ)², against
    torch's accumulated backward passes with the same noise."""
    p, ac = params(0), abar()
    xs, labels = data(4, 2)[:2]
    weights = np.array([1.0, 0.5], np.float32)
    cfg = ml_collections.ConfigDict(dict(diffusion=dict(num_diffusion_timesteps=1000),
                                         unlearn=dict(fisher_timestep_stride=250, n_chunks=2)))
    step = jax.jit(sa.make_fisher_step(StandIn(), cfg, ac))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    st = FisherState(step=jnp.int32(0), acc=zeros, partial=zeros)
    tp = to_torch(p)
    want = {k: np.zeros(np.shape(v), np.float32) for k, v in p.items()}
    for s in range(2):
        for v in tp.values():
            v.grad = None
        for j, t in enumerate(([0, 250], [500, 750])):
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), 2 * s + j), (2, H, H, C))
            st, m = step(st, p, xs[s], labels[s], weights[s], jax.random.key(0))
            loss = 250 * noise_loss_torch(tp, torch.tensor(xs[s]).expand(2, H, H, C), torch.full((2,), int(labels[s])),
                                          torch.tensor(t), torch.tensor(np.asarray(noise)), ac).sum()
            np.testing.assert_allclose(float(m["chunk_loss"]), float(loss.detach()), rtol=1e-5)
            loss.backward()
        for k, v in tp.items():
            want[k] += weights[s] * v.grad.numpy() ** 2
    for k in p:
        np.testing.assert_allclose(np.asarray(st.acc[k]), want[k], rtol=1e-4, atol=1e-7, err_msg=k)
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree_util.tree_leaves(st.partial))


@pytest.mark.parametrize("method", ["rl", "ga"])
def test_salun_loss_matches_torch(method):
    p, ac = params(0), abar()
    rx, rc, t_r, e_r = data(6, 5)
    fx, _, t_f, e_f = data(7, 3)
    fc = np.full(3, 4, np.int32)
    d_r, d_f = np.array([0, 1, 0, 0, 1], bool), np.array([0, 0, 1], bool)
    b = dict(rx=rx, rc=rc, t_r=t_r, e_r=e_r, d_r=d_r, fx=fx, fc=fc, t_f=t_f, e_f=e_f, d_f=d_f)
    alpha, pseudo = 0.3, 5
    val, grads = jax.jit(jax.value_and_grad(
        lambda q: salun.salun_loss(StandIn(), q, b, ac, alpha=alpha, method=method, pseudo=pseudo)[0]))(p)
    tp = to_torch(p)
    T = {k: torch.tensor(v) for k, v in b.items()}
    remain = noise_loss_torch(tp, T["rx"], T["rc"].long(), T["t_r"].long(), T["e_r"], ac, T["d_r"]).mean()
    if method == "ga":
        forget = -noise_loss_torch(tp, T["fx"], T["fc"].long(), T["t_f"].long(), T["e_f"], ac, T["d_f"]).mean()
    else:
        a = torch.tensor(ac)[T["t_f"].long()].view(-1, 1, 1, 1)
        x_t = T["fx"] * a.sqrt() + T["e_f"] * (1 - a).sqrt()
        out = torch_eps(tp, x_t, T["t_f"], T["fc"].long(), T["d_f"])
        target = torch_eps(tp, x_t, T["t_f"], torch.full((3,), pseudo), T["d_f"]).detach()
        forget = (out - target).square().sum(dim=(1, 2, 3)).mean()
    compare(val, grads, forget + alpha * remain, tp)


def test_esd_loss_matches_torch():
    p, frozen = params(0), params(1)
    x, labels, t, _ = data(8, 4)
    ng = 7.5
    val, grads = jax.jit(jax.value_and_grad(
        lambda q: esd.esd_loss(StandIn(), q, frozen, x, t.astype(np.float32), labels, ng)))(p)
    tp, tf = to_torch(p), {k: torch.tensor(np.asarray(v)) for k, v in frozen.items()}
    X, L, TT = torch.tensor(x), torch.tensor(labels).long(), torch.tensor(t)
    e_c = torch_eps(tf, X, TT, L)
    e_u = torch_eps(tf, X, TT, L, torch.ones(4, dtype=torch.bool))
    target = e_u - ng * (e_c - e_u)
    compare(val, grads, torch.nn.functional.mse_loss(torch_eps(tp, X, TT, L), target), tp)


def test_esd_partial_trajectory_is_ddim_down_to_the_stop_timestep():
    p, ac = params(0), abar()
    x = np.random.default_rng(9).normal(size=(2, H, H, C)).astype(np.float32)
    labels = np.array([2, 2], np.int32)
    seq = np.arange(0, 1000, 100, dtype=np.int32)
    eps_fn = diffusion.class_conditional_eps_fn(StandIn().apply, p, labels, 2.0)
    got = jax.jit(lambda x: esd.partial_ddim(eps_fn, x, jnp.asarray(seq), 6, ac, eta=0.0, rng=jax.random.key(0)))(x)
    tp = {k: torch.tensor(np.asarray(v)) for k, v in p.items()}
    xt = torch.tensor(x)
    for j in range(9, 6, -1):   # 900 -> 800 -> 700 -> 600
        at, an = float(ac[seq[j]]), float(ac[seq[j - 1]])
        tt = torch.full((2,), int(seq[j]))
        e = 3.0 * torch_eps(tp, xt, tt, torch.tensor(labels).long()) - 2.0 * torch_eps(
            tp, xt, tt, torch.tensor(labels).long(), torch.ones(2, dtype=torch.bool))
        x0 = (xt - e * (1 - at) ** 0.5) / at ** 0.5
        xt = an ** 0.5 * x0 + (1 - an) ** 0.5 * e
    np.testing.assert_allclose(np.asarray(got), xt.numpy(), rtol=1e-5, atol=1e-5)
    same = esd.partial_ddim(eps_fn, x, jnp.asarray(seq), 9, ac, eta=1.0, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(same), x)   # stop at the top: no step


def test_saliency_mask_keeps_the_top_ratio_of_all_elements():
    g = {"w": np.array([[0.1, -5.0], [0.3, 0.0]], np.float32), "b": np.array([2.0, -0.2], np.float32)}
    m = salun.saliency_mask(g, 0.5)
    np.testing.assert_array_equal(m["w"], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(m["b"], [1, 0])
    assert sum(int(v.sum()) for v in m.values()) == 3 and m["w"].dtype == np.uint8


def test_masked_parameters_do_not_move_in_a_salun_step():
    p, ac = params(0), abar()
    cfg = ml_collections.ConfigDict(dict(
        unlearn=dict(method="rl", alpha=1.0, label_to_forget=4), data=dict(n_classes=N_CLASSES),
        diffusion=dict(num_diffusion_timesteps=1000), model=dict(cond_drop_prob=0.1, ema_rate=0.99)))
    tx = make_optimizer(ml_collections.ConfigDict(dict(optimizer="Adam", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                                       weight_decay=0.0, amsgrad=False, grad_clip=1.0)),
                        "global_norm")
    mask = {"a": np.array([1, 0, 1], np.float32), "b": np.zeros(C, np.float32),
            "emb": np.ones((N_CLASSES + 1, C), np.float32), "s": np.float32(1)}
    st = PretrainState(step=jnp.int32(0), params=p, ema=p, opt=tx.init(p))
    rx, rc, _, _ = data(10, 4)
    fx = data(11, 2)[0]
    new, m = jax.jit(salun.make_salun_step(StandIn(), cfg, ac, tx))(st, mask, rx, rc, fx, np.full(2, 4, np.int32),
                                                             jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(new.params["b"]), p["b"])
    assert np.asarray(new.params["a"])[1] == p["a"][1] and np.asarray(new.params["a"])[0] != p["a"][0]
    assert np.isfinite(float(m["loss"]))
