"""SalUn (Fan et al. 2024) for the class-conditional DDPM: saliency-masked unlearning
(README: "The original release and our differences" › Baselines).

Two modes:

``salun_mask``  One pass over the forgotten class's real images: per batch, the gradient of the ε-MSE
                mean_B sum_HWC (ε − ε̂_s(x_t, t, K))² with guidance s = ``unlearn.mask_cond_scale`` (eval mode,
                antithetic t), clipped to global norm ``optim.grad_clip``, summed over the pass
                (:func:`make_mask_step`). The mask keeps the top ``unlearn.mask_ratio`` of all |g| elements of the
                whole network (1) and freezes the rest (0) (:func:`saliency_mask`); it is saved as ``mask.npz``.
``salun``       Fine-tuning on real images (:func:`make_salun_step`): L = L_forget + α·L_remain with
                α = ``unlearn.alpha``, L_remain the ε-MSE on remaining-class images and, by ``unlearn.method``,
                ``ga``: L_forget = −ε-MSE on forgotten-class images (gradient ascent), or
                ``rl``: random label — the prediction at the forgotten label is regressed onto the detached
                prediction at label (K+1) mod n_classes on the same noised image,
                L_forget = mean_B sum_HWC (ε̂(x_t, K) − sg[ε̂(x_t, K+1)])².
                Label dropout ``model.cond_drop_prob`` applies to every call (one mask for both calls of ``rl``),
                dropout on; gradients are multiplied by the mask, then clipped to global norm, Adam, EMA.

Where we differ from the original: the mask is saved (the original computed it and never wrote it); the two
flags the original read but never defined (an L1 sparsity term) are gone, so the method runs; an unknown
``unlearn.method`` is refused (the original left the forget loss undefined); ``rl``'s pseudo label is
(K+1) mod n_classes (the original's mod 10).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax.ddpm import diffusion
from sfd_jax.ddpm.baselines.common import AccumState, apply_gradients, constrainer, forget_label
from sfd_jax.ddpm.steps import antithetic_timesteps
from sfd_jax.distill.losses import denoising_loss
from sfd_jax.distill.state import PretrainState

METHODS = ("rl", "ga")


def make_mask_step(model, config, alphas_cumprod, *, batch_sharding=None):
    """``step(state: AccumState, params, images [B,H,W,C] in [-1,1], labels [B], weights [B], root_key)``
    ``-> (state, metrics)``: ``state.acc`` += the clipped gradient of this batch's weighted-mean ε-MSE (padding
    images carry weight 0)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    T = int(config.diffusion.num_diffusion_timesteps)
    cond_scale = float(config.unlearn.mask_cond_scale)
    clip = optax.clip_by_global_norm(float(config.optim.grad_clip))
    constrain = constrainer(batch_sharding)

    def step(state: AccumState, params, images, labels, weights, root_key):
        k_t, k_e = jax.random.split(jax.random.fold_in(root_key, state.step))
        B = images.shape[0]
        t = constrain(antithetic_timesteps(k_t, B, T))
        e = constrain(jax.random.normal(k_e, images.shape, jnp.float32))

        def loss_fn(p):
            eps_fn = diffusion.class_conditional_eps_fn(model.apply, p, labels, cond_scale)
            return (denoising_loss(eps_fn, images, t, e, ac) * weights).sum() / jnp.maximum(weights.sum(), 1.0)

        loss, g = jax.value_and_grad(loss_fn)(params)
        g, _ = clip.update(g, clip.init(params))
        acc = jax.tree_util.tree_map(jnp.add, state.acc, g)
        return AccumState(step=state.step + 1, acc=acc), {"loss": loss, "grad_norm": optax.global_norm(g)}

    return step


def saliency_mask(grad_sum, ratio: float):
    """1 for the ``round(ratio·N)`` largest |g| over all N elements of the tree (ties: the first in tree
    order), 0 elsewhere; uint8 host arrays in the tree's structure."""
    leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
    flat = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in leaves])
    k = int(round(float(ratio) * flat.size))
    keep = np.zeros(flat.size, np.uint8)
    if k > 0:
        keep[np.argsort(-flat, kind="stable")[:k]] = 1
    out, start = [], 0
    for x in leaves:
        n = int(np.prod(np.shape(x)))
        out.append(keep[start:start + n].reshape(np.shape(x)))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def salun_loss(model, params, b: dict, alphas_cumprod, *, alpha: float, method: str, pseudo: int, rngs=None):
    """(L, (L_forget, L_remain)) of the module docstring for explicit inputs ``b``: remain images ``rx``
    [B,H,W,C], labels ``rc``, timesteps ``t_r``, noise ``e_r``, null-class mask ``d_r``; the same ``f*`` for the
    forget images. ``rngs``: two dropout keys (None: eval mode)."""
    train = rngs is not None

    def eps(p, labels, drop, rng):
        return diffusion.class_conditional_eps_fn(model.apply, p, labels, drop_mask=drop, train=train, rng=rng)
    k_r, k_f = (None, None) if rngs is None else rngs
    l_r = denoising_loss(eps(params, b["rc"], b["d_r"], k_r), b["rx"], b["t_r"], b["e_r"], alphas_cumprod).mean()
    if method == "ga":
        l_f = -denoising_loss(eps(params, b["fc"], b["d_f"], k_f), b["fx"], b["t_f"], b["e_f"], alphas_cumprod).mean()
    else:
        x_t = diffusion.add_noise(b["fx"], b["t_f"], b["e_f"], jnp.asarray(alphas_cumprod, jnp.float32))
        tf = b["t_f"].astype(jnp.float32)
        k_a, k_b = (None, None) if k_f is None else jax.random.split(k_f)
        pred = eps(params, b["fc"], b["d_f"], k_a)(x_t, tf)
        target = jax.lax.stop_gradient(eps(params, jnp.full_like(b["fc"], pseudo), b["d_f"], k_b)(x_t, tf))
        l_f = jnp.sum(jnp.square(pred - target), axis=(1, 2, 3)).mean()
    return l_f + alpha * l_r, (l_f, l_r)


def make_salun_step(model, config, alphas_cumprod, tx: optax.GradientTransformation, *, batch_sharding=None):
    """``step(state: PretrainState, mask, remain_images [B,H,W,C], remain_labels [B], forget_images [B',H,W,C],
    forget_labels [B'], root_key) -> (state, metrics)``: the SalUn loss of the module docstring."""
    u = config.unlearn
    if u.method not in METHODS:
        raise ValueError(f"unlearn.method must be one of {', '.join(METHODS)}, got {u.method!r}")
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    T = int(config.diffusion.num_diffusion_timesteps)
    alpha, method = float(u.alpha), str(u.method)
    pseudo = (forget_label(config) + 1) % int(config.data.n_classes)
    drop_prob, ema_rate = float(config.model.cond_drop_prob), float(config.model.ema_rate)
    constrain = constrainer(batch_sharding)

    def step(state: PretrainState, mask, rx, rc, fx, fc, root_key):
        ks = jax.random.split(jax.random.fold_in(root_key, state.step), 8)
        Br, Bf = rx.shape[0], fx.shape[0]
        t_r, e_r = constrain(antithetic_timesteps(ks[0], Br, T)), constrain(jax.random.normal(ks[1], rx.shape))
        t_f, e_f = constrain(antithetic_timesteps(ks[2], Bf, T)), constrain(jax.random.normal(ks[3], fx.shape))
        d_r = constrain(jax.random.uniform(ks[4], (Br,)) < drop_prob)
        d_f = constrain(jax.random.uniform(ks[5], (Bf,)) < drop_prob)

        batch = dict(rx=rx, rc=rc, t_r=t_r, e_r=e_r, d_r=d_r, fx=fx, fc=fc, t_f=t_f, e_f=e_f, d_f=d_f)

        def loss_fn(p):
            return salun_loss(model, p, batch, ac, alpha=alpha, method=method, pseudo=pseudo, rngs=ks[6:8])

        (loss, (l_f, l_r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, mask)
        new = apply_gradients(state, grads, tx, ema_rate)
        return new, {"loss": loss, "forget_loss": l_f, "remain_loss": l_r, "grad_norm": optax.global_norm(grads)}

    return step
