"""Pure train steps: ``step(state, ..., root_key) -> (state, metrics)``
(README: "The original release and our differences" › DDPM pretraining, DDPM distillation).

Randomness comes only from ``fold_in(root_key, state.step)``, so a resumed run draws what an uninterrupted one
draws. All random arrays are drawn at global-batch shape and constrained to the batch sharding, and every mean is
over the global batch, so the same step gives the same numbers on 1 device or on a ('data', 'fsdp') mesh.

``fused=True`` runs the remain and forget passes of each update as one batch of 2B with per-part means (same
math, same random draws, one network call per pass); with dropout the two modes draw different dropout masks.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sfd_jax.ddpm import diffusion
from sfd_jax.distill.losses import denoising_loss, sid_generator_loss
from sfd_jax.ddpm.task import DDPMTask
from sfd_jax.distill.state import PretrainState, SFDState, ema_update


class FakeScoreKeys(NamedTuple):
    """The fake-score update's keys, in split order, each named by what it draws."""
    latents_remain: jax.Array      # z of the generator samples the fake score learns from
    latents_forget: jax.Array
    timesteps_remain: jax.Array    # t of the denoising loss
    timesteps_forget: jax.Array
    noise_remain: jax.Array        # ε of the denoising loss
    noise_forget: jax.Array
    label_drop: jax.Array          # which remain samples see the null class (``distill.cond_drop_prob``)
    dropout_remain: jax.Array      # network dropout (of the whole 2B batch when fused)
    dropout_forget: jax.Array


class GeneratorKeys(NamedTuple):
    """The generator update's keys, in split order, each named by what it draws."""
    latents_remain: jax.Array      # z of the generator samples being trained
    latents_forget: jax.Array
    timesteps_remain: jax.Array    # t at which teacher and fake score are compared
    timesteps_forget: jax.Array
    noise_remain: jax.Array        # ε that diffuses the samples to x_t
    noise_forget: jax.Array
    override_labels: jax.Array     # the labels the teacher sees on forget samples ('rand'/'prob' draws)
    dropout_remain: jax.Array      # generator dropout (of the whole 2B batch when fused)
    dropout_forget: jax.Array


def sfd_step_keys(root_key: jax.Array, step) -> tuple[jax.Array, FakeScoreKeys, GeneratorKeys]:
    """(remain-label key, fake-score keys, generator keys) from ``fold_in(root_key, step)``.

    One split into 19 keys in this order; the order is part of a run's numbers (changing it changes every draw of
    every step, so resumed runs of older checkpoints would no longer follow their original trajectory)."""
    n = len(FakeScoreKeys._fields)
    keys = jax.random.split(jax.random.fold_in(root_key, step), 1 + 2 * n)
    return keys[0], FakeScoreKeys(*keys[1:1 + n]), GeneratorKeys(*keys[1 + n:])


def forget_label_keys(root_key: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """The keys of the forgotten-class draws of the fake-score and generator updates when several classes are
    forgotten: keys 19 and 20 of one split of ``fold_in(root_key, step)`` into 21 (keys 0-18 of that split are never
    used, so no draw shares a key or counter with :func:`sfd_step_keys`'). A single-target step draws no forgotten
    class and never calls this, so its numbers are those of a run without it."""
    n = 1 + 2 * len(FakeScoreKeys._fields)
    keys = jax.random.split(jax.random.fold_in(root_key, step), n + 2)
    return keys[n], keys[n + 1]


class Part(NamedTuple):
    """One part (remain or forget) of an update's batch: labels [B], latents z and noise ε [B,H,W,C], timesteps
    t [B] int, and for the fake score's remain part the null-class mask [B] bool (None: no sample dropped)."""
    labels: jax.Array
    latents: jax.Array
    timesteps: jax.Array
    noise: jax.Array
    drop: jax.Array | None = None


def fuse(remain: Part, forget: Part) -> Part:
    """The two parts as one batch of 2B, remain first (a missing null-class mask is all False)."""
    drop = None
    if remain.drop is not None or forget.drop is not None:
        drop = jnp.concatenate([jnp.zeros(p.labels.shape, bool) if p.drop is None else p.drop
                                for p in (remain, forget)])
    return Part(*(jnp.concatenate([a, b]) for a, b in zip(remain[:4], forget[:4])), drop)


def weighted_update(params, opt_state, tx: optax.GradientTransformation, part_losses: Callable,
                    remain_coef: float, forget_coef: float, prefix: str):
    """One optimizer step on ``remain_coef·l_r + forget_coef·l_f`` with ``(l_r, l_f) = part_losses(params)``.
    Returns (params, opt_state, metrics ``{prefix}_remain_loss``, ``{prefix}_forget_loss``, ``{prefix}_total``)."""
    def loss(p):
        l_r, l_f = part_losses(p)
        return remain_coef * l_r + forget_coef * l_f, (l_r, l_f)

    (total, (l_r, l_f)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {f"{prefix}_remain_loss": l_r, f"{prefix}_forget_loss": l_f, f"{prefix}_total": total}
    return optax.apply_updates(params, updates), opt_state, metrics


def make_generator(model, alphas_cumprod, t_init: int) -> Callable:
    """``gen(params, labels [B], z [B,H,W,C], train, rng) -> x0`` the one-step generator map (cond_scale 0)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)

    def gen(params, labels, z, train=False, rng=None):
        eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, 0.0, train=train, rng=rng)
        return diffusion.generator_sample(eps_fn, z, t_init, ac)
    return gen


class SFDStep:
    """``step(state: SFDState, teacher_params, root_key) -> (SFDState, metrics)``, built by :func:`make_sfd_step`.

    One step is two updates, each on a remain part (labels c, uniform over the remaining classes) and, when the
    task forgets with a non-zero coefficient, a forget part (:meth:`forget_batch`; with several forgotten classes
    each update draws its samples' classes uniformly from the forgotten set, keys from :func:`forget_label_keys`):
    A. :meth:`fake_score_update` on generator samples (eval mode, no gradient to G): ε-MSE, coefficients
       sg_remain/forget_coef, clip by value, Adam.
    B. :meth:`generator_update` with the just-updated fake score: same c, fresh z/ε/t; SiD loss with teacher and
       fake score at c (remain) and teacher at the override labels / fake score at the forgotten class (forget);
       G dropout on; clip, Adam; EMA.
    With ``pseudo_label_type`` 'amax'/'prob' the override labels come from ``classifier_fn(x [B,H,W,C] in
    [-1,1]) -> logits`` applied to the fake score's clean estimate x̂ clamped to [-1, 1] (the original feeds
    clamp((x̂+1)/2, 0, 1) to a classifier that takes [0, 1] images), per timestep inside the loss.
    ``fused``: the remain and forget parts of each update run as one batch of 2B (:func:`fuse`) with per-part means.
    """

    def __init__(self, model, config, task: DDPMTask, alphas_cumprod, g_tx: optax.GradientTransformation,
                 sg_tx: optax.GradientTransformation, *, batch_size: int,
                 batch_sharding: jax.sharding.Sharding | None = None, fused: bool = True,
                 classifier_fn: Callable | None = None):
        if task.uses_classifier and classifier_fn is None:
            raise ValueError(f"pseudo_label_type={task.pseudo_label_type!r} needs a classifier (distill.clf_path)")
        d = config.distill
        self.model, self.task, self.g_tx, self.sg_tx = model, task, g_tx, sg_tx
        self.classifier_fn, self.batch_sharding, self.fused = classifier_fn, batch_sharding, fused
        self.ac = jnp.asarray(alphas_cumprod, jnp.float32)
        self.B = batch_size
        self.shape = (batch_size, config.data.image_size, config.data.image_size, config.model.in_channels)
        self.cond_scale, self.drop_prob = float(d.cond_scale), float(d.cond_drop_prob)
        self.alpha, self.diffinst = float(d.alpha), bool(d.use_diffinst)
        self.sg_r, self.sg_f = float(d.sg_remain_coef), float(d.sg_forget_coef)
        self.g_r, self.g_f = float(d.g_remain_coef), float(d.g_forget_coef)
        self.ema_rate = float(config.model.ema_rate)
        self.gen = make_generator(model, self.ac, int(d.t_init))

    # ------------------------------------------------------------------------------------------- helpers
    def constrain(self, x):
        return x if self.batch_sharding is None else jax.lax.with_sharding_constraint(x, self.batch_sharding)

    def normal(self, key):
        return self.constrain(jax.random.normal(key, self.shape, jnp.float32))

    def eps(self, params, labels, *, train=False, rng=None, drop=None):
        return diffusion.class_conditional_eps_fn(self.model.apply, params, labels, self.cond_scale, drop_mask=drop,
                                                  train=train, rng=rng)

    def remain_batch(self, keys: FakeScoreKeys | GeneratorKeys, labels, drop=None) -> Part:
        """The remain part of one update: the given labels c, fresh z and ε, t from the task's range."""
        return Part(labels, self.normal(keys.latents_remain),
                    self.constrain(self.task.timesteps(keys.timesteps_remain, self.B)), self.normal(keys.noise_remain),
                    drop)

    def forget_batch(self, keys: FakeScoreKeys | GeneratorKeys, step, forgets: bool,
                     label_key: jax.Array | None = None) -> Part | None:
        """The forget part of one update (None when ``forgets`` is False): the forgotten class (several: drawn
        uniformly from the forgotten set with ``label_key``), fresh z and ε, t from the forget range (widened
        during ``distill.forget_warmup``)."""
        if not forgets:
            return None
        return Part(self.constrain(self.task.forget_labels(label_key, self.B)), self.normal(keys.latents_forget),
                    self.constrain(self.task.forget_timesteps(keys.timesteps_forget, self.B, step)),
                    self.normal(keys.noise_forget))

    def classifier_override_teacher(self, teacher, fake, key, forget_labels, remain_labels=None):
        """Teacher eps fn whose forget samples use classifier labels on the fake score's x̂ (at ``forget_labels``).
        ``remain_labels``: labels of a fused batch's remain half, where the teacher stays at c."""
        n = 0 if remain_labels is None else remain_labels.shape[0]

        def eps_fn(x_t, t):
            x_f, t_f = (x_t, t) if n == 0 else (x_t[n:], t[n:])
            x0 = diffusion.eps_to_x0(x_f, self.eps(fake, forget_labels)(x_f, t_f), self.ac[t_f.astype(jnp.int32)])
            labels = self.task.classifier_labels(key, self.classifier_fn(jnp.clip(jax.lax.stop_gradient(x0), -1.0, 1.0)))
            if n:
                labels = jnp.concatenate([remain_labels, labels])
            return self.eps(teacher, labels)(x_t, t)
        return eps_fn

    # ------------------------------------------------------------------------------------------- A, B, step
    def fake_score_update(self, state: SFDState, keys: FakeScoreKeys, c, forget_label_key=None):
        """A. -> (fake_score, sg_opt, metrics): ε-MSE of the fake score on frozen generator samples."""
        B, ac = self.B, self.ac
        drop = self.constrain(jax.random.uniform(keys.label_drop, (B,)) < self.drop_prob)
        remain = self.remain_batch(keys, c, drop)
        forget = self.forget_batch(keys, state.step, self.task.forgets and self.sg_f > 0, forget_label_key)
        g_frozen = jax.lax.stop_gradient(state.generator)
        if forget is not None and self.fused:
            batch = fuse(remain, forget)
            x0 = jax.lax.stop_gradient(self.gen(g_frozen, batch.labels, batch.latents))

            def part_losses(p):
                eps_fn = self.eps(p, batch.labels, train=True, rng=keys.dropout_remain, drop=batch.drop)
                per = denoising_loss(eps_fn, x0, batch.timesteps, batch.noise, ac)
                return per[:B].mean(), per[B:].mean()
        else:
            x0_r = jax.lax.stop_gradient(self.gen(g_frozen, remain.labels, remain.latents))
            x0_f = None if forget is None else jax.lax.stop_gradient(self.gen(g_frozen, forget.labels, forget.latents))

            def part_losses(p):
                eps_r = self.eps(p, remain.labels, train=True, rng=keys.dropout_remain, drop=remain.drop)
                l_r = denoising_loss(eps_r, x0_r, remain.timesteps, remain.noise, ac).mean()
                if forget is None:
                    return l_r, jnp.float32(0.0)
                eps_f = self.eps(p, forget.labels, train=True, rng=keys.dropout_forget)
                return l_r, denoising_loss(eps_f, x0_f, forget.timesteps, forget.noise, ac).mean()

        return weighted_update(state.fake_score, state.sg_opt, self.sg_tx, part_losses, self.sg_r, self.sg_f, "sg")

    def generator_update(self, state: SFDState, fake_score, teacher, keys: GeneratorKeys, c, forget_label_key=None):
        """B. -> (generator, g_opt, metrics): SiD loss of the generator against the teacher and ``fake_score``."""
        B, ac, gen, eps, task = self.B, self.ac, self.gen, self.eps, self.task
        sid = functools.partial(sid_generator_loss, alphas_cumprod=ac, alpha=self.alpha, diffinst=self.diffinst)
        fake, teacher = jax.lax.stop_gradient(fake_score), jax.lax.stop_gradient(teacher)
        remain = self.remain_batch(keys, c)
        forget = self.forget_batch(keys, state.step, task.forgets and self.g_f > 0, forget_label_key)
        if forget is not None and not task.uses_classifier:
            # each forget sample's override is its own class's (label_to_override per class, or 'rand')
            override = self.constrain(task.override_labels(keys.override_labels, B, forget.labels))

        def forget_teacher(remain_labels=None):
            """The teacher's eps fn on the forget part (after ``remain_labels`` in a fused batch)."""
            if task.uses_classifier:
                return self.classifier_override_teacher(teacher, fake, keys.override_labels, forget.labels,
                                                        remain_labels)
            return eps(teacher, override if remain_labels is None else jnp.concatenate([remain_labels, override]))

        if forget is not None and self.fused:
            batch = fuse(remain, forget)

            def part_losses(p):
                x0 = gen(p, batch.labels, batch.latents, True, keys.dropout_remain)
                per = sid(forget_teacher(remain.labels), eps(fake, batch.labels), x0, batch.timesteps, batch.noise)
                return per[:B].mean(), per[B:].mean()
        else:
            def part_losses(p):
                x0_r = gen(p, remain.labels, remain.latents, True, keys.dropout_remain)
                l_r = sid(eps(teacher, c), eps(fake, c), x0_r, remain.timesteps, remain.noise).mean()
                if forget is None:
                    return l_r, jnp.float32(0.0)
                x0_f = gen(p, forget.labels, forget.latents, True, keys.dropout_forget)
                return l_r, sid(forget_teacher(), eps(fake, forget.labels), x0_f, forget.timesteps, forget.noise).mean()

        return weighted_update(state.generator, state.g_opt, self.g_tx, part_losses, self.g_r, self.g_f, "g")

    def __call__(self, state: SFDState, teacher, root_key):
        label_key, fake_score_keys, generator_keys = sfd_step_keys(root_key, state.step)
        sg_forget_key, g_forget_key = (forget_label_keys(root_key, state.step) if self.task.n_forget > 1
                                       else (None, None))
        c = self.constrain(self.task.remain_labels(label_key, self.B))
        fake_score, sg_opt, sg_metrics = self.fake_score_update(state, fake_score_keys, c, sg_forget_key)
        generator, g_opt, g_metrics = self.generator_update(state, fake_score, teacher, generator_keys, c,
                                                            g_forget_key)
        new = SFDState(step=state.step + 1, generator=generator,
                       generator_ema=ema_update(state.generator_ema, generator, self.ema_rate),
                       fake_score=fake_score, g_opt=g_opt, sg_opt=sg_opt)
        return new, {**sg_metrics, **g_metrics}


def make_sfd_step(model, config, task: DDPMTask, alphas_cumprod, g_tx: optax.GradientTransformation,
                  sg_tx: optax.GradientTransformation, *, batch_size: int,
                  batch_sharding: jax.sharding.Sharding | None = None, fused: bool = True,
                  classifier_fn: Callable | None = None) -> Callable:
    """Build ``step(state: SFDState, teacher_params, root_key) -> (SFDState, metrics)`` (an :class:`SFDStep`)."""
    return SFDStep(model, config, task, alphas_cumprod, g_tx, sg_tx, batch_size=batch_size,
                   batch_sharding=batch_sharding, fused=fused, classifier_fn=classifier_fn)


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
