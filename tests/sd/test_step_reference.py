"""The SD SFD round losses and their gradients against the original's semantics written here in PyTorch
(README: "The original release and our differences" › SD distillation): diffusers UNets with the same
weights, the same random numbers, fp32.

One accumulation round of each phase with guidance (κ 4.5 / 3 / 2), negative prompts, context dropout and
alpha != 1; a forget sample whose override embedding is NaN is dropped from the loss (NaN masking)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sd_testutil import make_pipeline, nchw

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

M = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sfd_jax.convert import diffusers_weights as dw
    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.step import SDStepSettings, make_round_losses

    folder = str(tmp_path_factory.mktemp("sd"))
    pipe = make_pipeline(folder)
    comps = load_components(folder, components=("unet", "text_encoder", "tokenizer", "scheduler"))
    rng = np.random.default_rng(0)
    perturb = lambda p, scale, seed: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x + scale * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32), p)
    teacher = comps.unet_params
    fake, gen = perturb(teacher, 0.01, 1), perturb(teacher, 0.01, 2)
    # table rows: 0 = "", 1-2 negatives, 3.. forget/override strings (random embeddings: text-encoder parity is
    # tested elsewhere); row 9 is NaN to exercise the masking.
    table = rng.standard_normal((10, 77, 32)).astype(np.float32)
    table[9] = np.nan
    settings = SDStepSettings(batch=M, micro=M, latent_shape=(8, 8, 4), t_init=625, alpha=1.2, tmin=20, tmax=980,
                              k1=4.5, k2=3.0, k4=2.0, use_neg=(True, True, True), sid_w_neg=True,
                              sg_w_override=True, has_neg=True, n_neg=2, dropout_p=0.5,
                              sg_remain_coef=1.0, sg_forget_coef=0.5, g_remain_coef=1.0, g_forget_coef=0.25,
                              ls=2.0, lsg=3.0)
    losses = make_round_losses(comps.unet, comps.text_encoder, comps.schedule.alphas_cumprod, settings)
    ids = np.asarray(__import__("sfd_jax.sd.tokenizer", fromlist=["tokenize"]).tokenize(
        comps.tokenizer, ["a red house", "two cats", "the sea at night", "a bowl of fruit"]))
    round_batch = {"sg_remain": ids, "g_remain": ids[::-1].copy(),
                   "sg_forget": np.array([3, 4, 5, 6], np.int32), "sg_override": np.array([7, 8, 7, 9], np.int32),
                   "sg_neg": np.array([1, 2, 2, 1], np.int32),
                   "g_forget": np.array([4, 5, 6, 3], np.int32), "g_override": np.array([8, 7, 9, 8], np.int32),
                   "g_neg": np.array([2, 1, 1, 2], np.int32)}
    frozen = {"teacher": teacher, "text_encoder": comps.text_encoder_params, "table": jnp.asarray(table)}

    def torch_unet(params):
        unet = type(pipe.unet)(**pipe.unet.config).eval()
        unet.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in dw.params_to_state_dict(params).items()})
        return unet

    from sfd_jax.models.clip_text import text_embeddings
    emb = {k: np.asarray(text_embeddings(comps.text_encoder, comps.text_encoder_params, jnp.asarray(round_batch[k])))
           for k in ("sg_remain", "g_remain")}
    return dict(comps=comps, settings=settings, losses=losses, rb=round_batch, frozen=frozen, table=table, emb=emb,
                teacher=teacher, fake=fake, gen=gen, torch_unet=torch_unet,
                ac=torch.from_numpy(np.asarray(comps.schedule.alphas_cumprod, np.float32)))


# ----------------------------------------------------------------------------------- the reference (torch)
def _t(x):
    return torch.from_numpy(nchw(np.asarray(x, np.float32)).copy())


def _generator(G, z, emb, ac, t_init=625):
    a = ac[t_init]
    x_t = (1 - a).sqrt() * z
    eps = G(x_t, torch.full((z.shape[0],), t_init), emb).sample
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _denoise(net, images, noise, t, ac, cond, uncond, w, predict_x0):
    a = ac[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * images + (1 - a).sqrt() * noise
    if w == 1:
        eps = net(x_t, t, cond).sample
    else:
        out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).sample
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + w * (eps_c - eps_u)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt() if predict_x0 else eps


def _draw(setup, key):
    d = setup["losses"].draws(key)
    return {k: (np.asarray(v) if k != "gen_key" else v) for k, v in d.items()}


def _sg_reference(setup, fake_t, G_t):
    s, rb, table, ac = setup["settings"], setup["rb"], setup["table"], setup["ac"]
    kr, kf = jax.random.split(jax.random.key(14))
    empty = torch.from_numpy(np.broadcast_to(table[0], (M, 77, 32)).copy())
    tab = torch.from_numpy(table)
    # remain: dropout blanks the prompt but not its negative; G generates from the post-dropout prompt
    d = _draw(setup, kr)
    drop = torch.from_numpy(d["drop"])[:, None, None]
    emb = torch.where(drop, empty, torch.from_numpy(setup["emb"]["sg_remain"]))
    neg = tab[torch.from_numpy(np.asarray(d["neg"]))]
    with torch.no_grad():
        images = _generator(G_t, _t(d["z"]), emb, ac)
    eps = _denoise(fake_t, images, _t(d["noise"]), torch.from_numpy(d["t"]).long(), ac, emb, neg, s.k1, False)
    per = ((eps - _t(d["noise"])) ** 2).sum(dim=(1, 2, 3))
    ok = ~torch.isnan(per)
    l_r = per[ok].sum() * s.ls / s.batch
    # forget with sg_w_override and negatives: the override prompts replace the forget prompts, both blanked
    d = _draw(setup, kf)
    drop = torch.from_numpy(d["drop"])[:, None, None]
    f = torch.where(drop, empty, tab[torch.from_numpy(rb["sg_override"]).long()])
    n = torch.where(drop, empty, tab[torch.from_numpy(rb["sg_neg"]).long()])
    with torch.no_grad():
        images = _generator(G_t, _t(d["z"]), f, ac)
    eps = _denoise(fake_t, images, _t(d["noise"]), torch.from_numpy(d["t"]).long(), ac, f, n, s.k1, False)
    per = ((eps - _t(d["noise"])) ** 2).sum(dim=(1, 2, 3))
    ok = ~torch.isnan(per)
    l_f = per[ok].sum() * s.ls / s.batch
    return s.sg_remain_coef * l_r + s.sg_forget_coef * l_f, l_r, l_f, int(ok.sum())


def _sid(images, y_real, y_fake, alpha):
    w = (images - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5).detach()
    if alpha == 1:
        return ((y_real - y_fake) * (y_fake - images) / w).sum(dim=(1, 2, 3))
    return ((y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / w).sum(dim=(1, 2, 3))


def _g_reference(setup, G_t, fake_t, teacher_t):
    s, rb, table, ac = setup["settings"], setup["rb"], setup["table"], setup["ac"]
    kr, kf = jax.random.split(jax.random.key(12))
    tab = torch.from_numpy(table)
    d = _draw(setup, kr)
    emb = torch.from_numpy(setup["emb"]["g_remain"])
    neg = tab[torch.from_numpy(np.asarray(d["neg"]))]
    images = _generator(G_t, _t(d["z"]), emb, ac)
    t = torch.from_numpy(d["t"]).long()
    y_fake = _denoise(fake_t, images, _t(d["noise"]), t, ac, emb, neg, s.k2, True)
    y_real = _denoise(teacher_t, images, _t(d["noise"]), t, ac, emb, neg, s.k4, True)
    per = _sid(images, y_real, y_fake, s.alpha)
    ok = ~torch.isnan(per)
    l_r = per[ok].sum() * s.lsg / s.batch
    # forget: teacher at the override prompts, the fake score (sg_w_override) too
    d = _draw(setup, kf)
    f, o, n = (tab[torch.from_numpy(rb[k]).long()] for k in ("g_forget", "g_override", "g_neg"))
    images = _generator(G_t, _t(d["z"]), f, ac)
    t = torch.from_numpy(d["t"]).long()
    y_fake = _denoise(fake_t, images, _t(d["noise"]), t, ac, o, n, s.k2, True)
    y_real = _denoise(teacher_t, images, _t(d["noise"]), t, ac, o, n, s.k4, True)
    per = _sid(images, y_real, y_fake, s.alpha)
    ok = ~torch.isnan(per).reshape(-1)
    l_f = per[ok].sum() * s.lsg / s.batch
    return s.g_remain_coef * l_r + s.g_forget_coef * l_f, l_r, l_f, int(ok.sum())


# ------------------------------------------------------------------------------------------------ tests
def _compare_grads(ours, net_t, rtol=2e-3):
    from sfd_jax.convert import diffusers_weights as dw
    ours = dw.params_to_state_dict(jax.device_get(ours))
    worst = 0.0
    for name, p in net_t.named_parameters():
        g = p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
        o = ours[name]
        scale = max(np.abs(g).max(), 1e-6)
        worst = max(worst, float(np.abs(o - g).max() / scale))
    assert worst <= rtol, worst


def test_fake_score_round_loss_and_gradient_match_reference(setup):
    s = setup
    fake_t, G_t = s["torch_unet"](s["fake"]), s["torch_unet"](s["gen"])
    total, l_r, l_f, kept_f = _sg_reference(s, fake_t, G_t)
    total.backward()
    (loss, aux), grads = jax.jit(jax.value_and_grad(s["losses"].sg, has_aux=True))(
        s["fake"], s["frozen"], s["gen"], s["rb"], jax.random.key(14))
    assert kept_f == 3  # the NaN override row (sg_w_override) drops one forget sample
    np.testing.assert_allclose(float(aux[0]), float(l_r), rtol=2e-5)
    np.testing.assert_allclose(float(aux[1]), float(l_f), rtol=2e-5)
    assert int(aux[3]) == kept_f and int(aux[2]) == M
    np.testing.assert_allclose(float(loss), float(total), rtol=2e-5)
    # Gradients: the NaN sample poisons the same entries in both (then nan_to_num'd by the step): compare after it.
    from sfd_jax.sd.optim import nan_to_num_grads
    for p in fake_t.parameters():
        if p.grad is not None:
            p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    _compare_grads(nan_to_num_grads(grads), fake_t)


def test_generator_round_loss_and_gradient_match_reference(setup):
    s = setup
    G_t, fake_t, teacher_t = s["torch_unet"](s["gen"]), s["torch_unet"](s["fake"]), s["torch_unet"](s["teacher"])
    for p in list(fake_t.parameters()) + list(teacher_t.parameters()):
        p.requires_grad_(False)
    rb = dict(s["rb"], g_override=np.array([8, 7, 7, 8], np.int32))  # no NaN here: compare the full gradient
    s2 = dict(s, rb=rb)
    total, l_r, l_f, kept_f = _g_reference(s2, G_t, fake_t, teacher_t)
    total.backward()
    (loss, aux), grads = jax.jit(jax.value_and_grad(s["losses"].g, has_aux=True))(
        s["gen"], s["frozen"], s["fake"], rb, jax.random.key(12))
    assert kept_f == M
    np.testing.assert_allclose(float(aux[0]), float(l_r), rtol=1e-4)
    np.testing.assert_allclose(float(aux[1]), float(l_f), rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-4)
    _compare_grads(grads, G_t)


def test_generator_nan_sample_is_dropped_from_the_loss(setup):
    s = setup
    G_t, fake_t, teacher_t = s["torch_unet"](s["gen"]), s["torch_unet"](s["fake"]), s["torch_unet"](s["teacher"])
    with torch.no_grad():
        total, l_r, l_f, kept_f = _g_reference(s, G_t, fake_t, teacher_t)
    loss, aux = jax.jit(s["losses"].g)(s["gen"], s["frozen"], s["fake"], s["rb"], jax.random.key(12))
    assert kept_f == M - 1 and int(aux[3]) == M - 1
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(aux[1]), float(l_f), rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-4)
