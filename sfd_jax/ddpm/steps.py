"""Pure train steps: ``step(state, ..., root_key) -> (state, metrics)``
(README: "The original release and our differences" › DDPM pretraining, DDPM distillation).

Randomness comes only from ``fold_in(root_key, state.step)``, so a resumed run draws what an uninterrupted one
draws. All random arrays are drawn at global-batch shape and constrained to the batch sharding, and every mean is
over the global batch, so the same step gives the same numbers on 1 device or on a ('data', 'fsdp') mesh.

``fused=True`` runs the remain and forget passes of each update as one batch of 2B with per-part means (same
math, same random draws, one network call per pass); with dropout the two modes draw different dropout masks.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sfd_jax.ddpm import diffusion
from sfd_jax.distill.losses import denoising_loss, sid_generator_loss
from sfd_jax.ddpm.task import DDPMTask
from sfd_jax.distill.state import PretrainState, SFDState, ema_update

_SFD_KEYS = ("c", "sg_z_r", "sg_z_f", "sg_t_r", "sg_t_f", "sg_e_r", "sg_e_f", "sg_drop", "sg_do_r", "sg_do_f",
             "g_z_r", "g_z_f", "g_t_r", "g_t_f", "g_e_r", "g_e_f", "override", "g_do_r", "g_do_f")


def make_generator(model, alphas_cumprod, t_init: int) -> Callable:
    """``gen(params, labels [B], z [B,H,W,C], train, rng) -> x0`` the one-step generator map (cond_scale 0)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)

    def gen(params, labels, z, train=False, rng=None):
        eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, 0.0, train=train, rng=rng)
        return diffusion.generator_sample(eps_fn, z, t_init, ac)
    return gen


def make_sfd_step(model, config, task: DDPMTask, alphas_cumprod, g_tx: optax.GradientTransformation,
                  sg_tx: optax.GradientTransformation, *, batch_size: int,
                  batch_sharding: jax.sharding.Sharding | None = None, fused: bool = True,
                  classifier_fn: Callable | None = None) -> Callable:
    """Build ``step(state: SFDState, teacher_params, root_key) -> (SFDState, metrics)``.

    A. fake-score update on generator samples (eval mode, no gradient to G): remain labels c (uniform over the
       remaining classes) + forget labels, ε-MSE, coefficients sg_remain/forget_coef, clip by value, Adam.
    B. generator update with the just-updated fake score: same c, fresh z/ε/t; SiD loss with teacher and fake
       score at c (remain) and teacher at override / fake at forget (forget); G dropout on; clip, Adam; EMA.
    With ``pseudo_label_type`` 'amax'/'prob' the override labels come from ``classifier_fn(x [B,H,W,C] in
    [-1,1]) -> logits`` applied to the fake score's clean estimate x̂ clamped to [-1, 1] (the original feeds
    clamp((x̂+1)/2, 0, 1) to a classifier that takes [0, 1] images), per timestep inside the loss.
    """
    if task.uses_classifier and classifier_fn is None:
        raise ValueError(f"pseudo_label_type={task.pseudo_label_type!r} needs a classifier (distill.clf_path)")
    d = config.distill
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    res, ch = config.data.image_size, config.model.in_channels
    B = batch_size
    shape = (B, res, res, ch)
    cond_scale, drop_prob = float(d.cond_scale), float(d.cond_drop_prob)
    alpha, diffinst = float(d.alpha), bool(d.use_diffinst)
    sg_r, sg_f = float(d.sg_remain_coef), float(d.sg_forget_coef)
    g_r, g_f = float(d.g_remain_coef), float(d.g_forget_coef)
    do_sg_f = task.forgets and sg_f > 0
    do_g_f = task.forgets and g_f > 0
    ema_rate = float(config.model.ema_rate)
    gen = make_generator(model, ac, int(d.t_init))

    def constrain(x):
        return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

    def eps(params, labels, *, train=False, rng=None, drop=None):
        return diffusion.class_conditional_eps_fn(model.apply, params, labels, cond_scale, drop_mask=drop,
                                                  train=train, rng=rng)

    def normal(key):
        return constrain(jax.random.normal(key, shape, jnp.float32))

    def override_teacher(teacher, fake, key, forget, remain_labels=None):
        """Teacher eps fn whose forget samples use classifier labels on the fake score's x̂ (at the ``forget``
        labels). ``remain_labels``: labels of a fused batch's remain half, where the teacher stays at c."""
        def eps_fn(x_t, t):
            ti = t.astype(jnp.int32)
            a = ac[ti].reshape(-1, 1, 1, 1)
            x_part = x_t if remain_labels is None else x_t[remain_labels.shape[0]:]
            t_part = t if remain_labels is None else t[remain_labels.shape[0]:]
            a_part = a if remain_labels is None else a[remain_labels.shape[0]:]
            sg_e = eps(fake, forget)(x_part, t_part)
            sg_x = jax.lax.stop_gradient((x_part - jnp.sqrt(1 - a_part) * sg_e) / jnp.sqrt(a_part))
            labels = task.classifier_labels(key, classifier_fn(jnp.clip(sg_x, -1.0, 1.0)))
            if remain_labels is not None:
                labels = jnp.concatenate([remain_labels, labels])
            return eps(teacher, labels)(x_t, t)
        return eps_fn

    def step(state: SFDState, teacher, root_key):
        k = dict(zip(_SFD_KEYS, jax.random.split(jax.random.fold_in(root_key, state.step), len(_SFD_KEYS))))
        zeros = jnp.float32(0.0)
        c = constrain(task.remain_labels(k["c"], B))
        forget = constrain(task.forget_labels(B))

        # ---------------------------------------------------------------- A. fake-score update
        g_frozen = jax.lax.stop_gradient(state.generator)
        z_r, t_r, e_r = normal(k["sg_z_r"]), constrain(task.timesteps(k["sg_t_r"], B)), normal(k["sg_e_r"])
        drop_r = constrain(jax.random.uniform(k["sg_drop"], (B,)) < drop_prob)
        if do_sg_f:
            z_f, e_f = normal(k["sg_z_f"]), normal(k["sg_e_f"])
            t_f = constrain(task.forget_timesteps(k["sg_t_f"], B, state.step))
        if do_sg_f and fused:
            x0 = jax.lax.stop_gradient(gen(g_frozen, jnp.concatenate([c, forget]), jnp.concatenate([z_r, z_f])))
            labels2, drop2 = jnp.concatenate([c, forget]), jnp.concatenate([drop_r, jnp.zeros((B,), bool)])
            t2, e2 = jnp.concatenate([t_r, t_f]), jnp.concatenate([e_r, e_f])
        else:
            x0_r = jax.lax.stop_gradient(gen(g_frozen, c, z_r))
            x0_f = jax.lax.stop_gradient(gen(g_frozen, forget, z_f)) if do_sg_f else None

        def sg_loss(p):
            if do_sg_f and fused:
                per = denoising_loss(eps(p, labels2, train=True, rng=k["sg_do_r"], drop=drop2), x0, t2, e2, ac)
                l_r, l_f = per[:B].mean(), per[B:].mean()
            else:
                l_r = denoising_loss(eps(p, c, train=True, rng=k["sg_do_r"], drop=drop_r), x0_r, t_r, e_r, ac).mean()
                l_f = (denoising_loss(eps(p, forget, train=True, rng=k["sg_do_f"]), x0_f, t_f, e_f, ac).mean()
                       if do_sg_f else zeros)
            return sg_r * l_r + sg_f * l_f, (l_r, l_f)

        (sg_total, (sg_lr, sg_lf)), grads = jax.value_and_grad(sg_loss, has_aux=True)(state.fake_score)
        updates, sg_opt = sg_tx.update(grads, state.sg_opt, state.fake_score)
        fake_score = optax.apply_updates(state.fake_score, updates)

        # ---------------------------------------------------------------- B. generator update
        fake_frozen, teacher = jax.lax.stop_gradient(fake_score), jax.lax.stop_gradient(teacher)
        gz_r, gt_r, ge_r = normal(k["g_z_r"]), constrain(task.timesteps(k["g_t_r"], B)), normal(k["g_e_r"])
        if do_g_f:
            gz_f, ge_f = normal(k["g_z_f"]), normal(k["g_e_f"])
            gt_f = constrain(task.forget_timesteps(k["g_t_f"], B, state.step))
            if not task.uses_classifier:
                override = constrain(task.override_labels(k["override"], B))

        def g_loss(p):
            if do_g_f and fused:
                x0g = gen(p, jnp.concatenate([c, forget]), jnp.concatenate([gz_r, gz_f]), True, k["g_do_r"])
                teacher_fn = (override_teacher(teacher, fake_frozen, k["override"], forget, c) if task.uses_classifier
                              else eps(teacher, jnp.concatenate([c, override])))
                per = sid_generator_loss(teacher_fn, eps(fake_frozen, jnp.concatenate([c, forget])), x0g,
                                         jnp.concatenate([gt_r, gt_f]), jnp.concatenate([ge_r, ge_f]), ac, alpha,
                                         diffinst)
                l_r, l_f = per[:B].mean(), per[B:].mean()
            else:
                x0g = gen(p, c, gz_r, True, k["g_do_r"])
                l_r = sid_generator_loss(eps(teacher, c), eps(fake_frozen, c), x0g, gt_r, ge_r, ac, alpha,
                                         diffinst).mean()
                if do_g_f:
                    x0f = gen(p, forget, gz_f, True, k["g_do_f"])
                    teacher_fn = (override_teacher(teacher, fake_frozen, k["override"], forget) if task.uses_classifier
                                  else eps(teacher, override))
                    l_f = sid_generator_loss(teacher_fn, eps(fake_frozen, forget), x0f, gt_f, ge_f, ac, alpha,
                                             diffinst).mean()
                else:
                    l_f = zeros
            return g_r * l_r + g_f * l_f, (l_r, l_f)

        (g_total, (g_lr, g_lf)), grads = jax.value_and_grad(g_loss, has_aux=True)(state.generator)
        updates, g_opt = g_tx.update(grads, state.g_opt, state.generator)
        generator = optax.apply_updates(state.generator, updates)
        new = SFDState(step=state.step + 1, generator=generator,
                       generator_ema=ema_update(state.generator_ema, generator, ema_rate),
                       fake_score=fake_score, g_opt=g_opt, sg_opt=sg_opt)
        metrics = dict(sg_remain_loss=sg_lr, sg_forget_loss=sg_lf, sg_total=sg_total,
                       g_remain_loss=g_lr, g_forget_loss=g_lf, g_total=g_total)
        return new, metrics

    return step


def antithetic_timesteps(key, n: int, num_timesteps: int) -> jax.Array:
    """n//2+1 draws from U{0..T−1}, concatenated with T−1−t, first n kept (the original's pretraining t)."""
    t = jax.random.randint(key, (n // 2 + 1,), 0, num_timesteps)
    return jnp.concatenate([t, num_timesteps - 1 - t])[:n]


def make_pretrain_step(model, config, alphas_cumprod, tx: optax.GradientTransformation,
                       batch_sharding: jax.sharding.Sharding | None = None) -> Callable:
    """Build ``step(state: PretrainState, images [B,H,W,C] in [-1,1], labels [B], root_key) -> (state, metrics)``:
    ε-MSE (sum over pixels, mean over batch), antithetic t, label dropout ``model.cond_drop_prob``, dropout on,
    global-norm clipping + Adam (in ``tx``), EMA."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    T = int(config.diffusion.num_diffusion_timesteps)
    drop_prob = float(config.model.cond_drop_prob)
    ema_rate = float(config.model.ema_rate)

    def constrain(x):
        return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

    def step(state: PretrainState, images, labels, root_key):
        k_t, k_e, k_drop, k_do = jax.random.split(jax.random.fold_in(root_key, state.step), 4)
        B = images.shape[0]
        t = constrain(antithetic_timesteps(k_t, B, T))
        noise = constrain(jax.random.normal(k_e, images.shape, jnp.float32))
        drop = constrain(jax.random.uniform(k_drop, (B,)) < drop_prob)

        def loss_fn(p):
            eps_fn = diffusion.class_conditional_eps_fn(model.apply, p, labels, 0.0, drop_mask=drop, train=True,
                                                        rng=k_do)
            return denoising_loss(eps_fn, images, t, noise, ac).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt = tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        new = PretrainState(step=state.step + 1, params=params, ema=ema_update(state.ema, params, ema_rate),
                            opt=opt)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return step
