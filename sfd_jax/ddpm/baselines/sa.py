"""Selective Amnesia (Heng & Soh 2023) for the class-conditional DDPM
(README: "The original release and our differences" › Baselines).

Two modes:

``sa_fim``  The replay set and the Fisher diagonal of the pretrained model θ*. The replay set is
            ``unlearn.n_replay_per_class`` samples of every remaining class drawn from θ* itself (DDIM with
            guidance, ``unlearn.replay_*``), stored as uint8 like any sample file. The Fisher is
            F = mean over replay samples x of (∇θ Σ_t ℓ(x, t))², ℓ(x, t) = sum_HWC (ε − ε̂(√ā_t x + √(1−ā_t) ε, t, c))²
            with the sum over every timestep t = 0..T−1 (every ``fisher_timestep_stride``-th one, the sum scaled by
            the stride, where a recipe says so), in ``unlearn.n_chunks`` chunks of timesteps so memory stays at one
            chunk's batch (one chunk per step); the network runs in eval mode at the sample's class
            (:func:`make_fisher_step`).
``sa``      Forgetting (:func:`make_sa_step`): per step, B surrogate images of uniform noise in [−1, 1] labelled
            with the forgotten class and B replay samples of the other classes, antithetic t for each, and
            L = mean_B ℓ(x_noise, K) + γ·mean_B ℓ(x_replay, c) + λ·Σ F·(θ − θ*)²
            with γ = ``training.gamma``, λ = ``training.lmbda``, no label dropout, dropout on, global-norm
            clipping, Adam, EMA.

Where we differ from the original: the Fisher step runs as a mode of its own (the original's is unreachable from
any mode); it sees the replay samples in [−1, 1] as the model does (the original fed it [0, 1] images, and its
replay images were min–max stretched one by one); γ and λ are recipe keys (the original read keys no config
defined); replay batches are drawn with replacement by the step's key (the original cycled a loader).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax.data import to_model_space
from sfd_jax.ddpm import diffusion
from sfd_jax.ddpm.baselines.common import FisherState, apply_gradients, constrainer, forget_label, tree_sum_sq_diff
from sfd_jax.ddpm.steps import antithetic_timesteps
from sfd_jax.distill.losses import denoising_loss
from sfd_jax.distill.state import PretrainState


def fisher_timesteps(config) -> tuple[np.ndarray, int]:
    """(timesteps int32 [n_chunks, chunk], stride): every stride-th t in 0..T−1, split into ``n_chunks``."""
    u = config.unlearn
    T = int(config.diffusion.num_diffusion_timesteps)
    stride, n_chunks = int(u.fisher_timestep_stride), int(u.n_chunks)
    ts = np.arange(0, T, stride, dtype=np.int32)
    if stride < 1 or n_chunks < 1 or len(ts) % n_chunks:
        raise ValueError(f"unlearn.n_chunks={n_chunks} must divide the {len(ts)} timesteps of "
                         f"unlearn.fisher_timestep_stride={stride}")
    return ts.reshape(n_chunks, -1), stride


def fisher_chunk_grad(model, params, x, label, t, noise, alphas_cumprod, stride: int = 1, constrain=None):
    """(∇θ Σ_{t in chunk} stride·ℓ(x, t), that sum) for one sample x [H,W,C] of class ``label`` at the chunk's
    timesteps t [n] with noise [n,H,W,C], as one batch; eval mode, no label dropout."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    constrain = constrain or (lambda a: a)
    n = t.shape[0]
    x_b = constrain(jnp.broadcast_to(x, (n,) + x.shape))

    def loss(p):
        eps_fn = diffusion.class_conditional_eps_fn(model.apply, p, jnp.full((n,), label, jnp.int32))
        return stride * denoising_loss(eps_fn, x_b, constrain(t), constrain(noise), ac).sum()
    val, g = jax.value_and_grad(loss)(params)
    return g, val


def make_fisher_step(model, config, alphas_cumprod, *, batch_sharding=None):
    """``step(state: FisherState, params, x [H,W,C] in [-1,1], label, weight, root_key) -> (state, metrics)``.

    One step is one chunk of one sample: step k works on sample k // n_chunks, chunk j = k % n_chunks. It adds
    the chunk's gradient (:func:`fisher_chunk_grad`) to ``state.partial``; after the last chunk it adds
    weight·partial² to ``state.acc`` and clears ``partial``. Memory is one chunk's batch (split over the mesh) and
    three parameter-sized trees; every step is a checkpointable unit. (A scan over chunks inside one step computes
    the same, but XLA:CPU runs gradients inside loops about ten times slower.)"""
    chunks, stride = fisher_timesteps(config)
    n_chunks, chunks = int(chunks.shape[0]), jnp.asarray(chunks)
    constrain = constrainer(batch_sharding)

    def step(state: FisherState, params, x, label, weight, root_key):
        j = state.step % n_chunks
        t = constrain(chunks[j])
        noise = constrain(jax.random.normal(jax.random.fold_in(root_key, state.step), t.shape + x.shape, jnp.float32))
        g, total = fisher_chunk_grad(model, params, x, label, t, noise, alphas_cumprod, stride, constrain)
        partial = jax.tree_util.tree_map(jnp.add, state.partial, g)
        last = j == n_chunks - 1
        acc = jax.tree_util.tree_map(lambda a, q: jnp.where(last, a + weight * jnp.square(q), a), state.acc, partial)
        partial = jax.tree_util.tree_map(lambda q: jnp.where(last, jnp.zeros_like(q), q), partial)
        return FisherState(step=state.step + 1, acc=acc, partial=partial), {"chunk_loss": total}

    return step


def sa_loss(model, params, anchor, fisher, x, labels, t, noise, alphas_cumprod, *, n_forget: int, gamma: float,
            lmbda: float, train: bool = False, rng=None):
    """(L, (L_forget, L_replay, EWC)): L = mean ℓ over the first ``n_forget`` samples (the surrogates) + γ·mean ℓ
    over the rest (the replay) + λ·Σ F·(θ − θ*)². x, noise: [B,H,W,C]; labels, t: [B]; one network call."""
    eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, train=train, rng=rng)
    per = denoising_loss(eps_fn, x, t, noise, alphas_cumprod)
    l_f, l_r = per[:n_forget].mean(), per[n_forget:].mean()
    ewc = tree_sum_sq_diff(fisher, params, anchor)
    return l_f + gamma * l_r + lmbda * ewc, (l_f, l_r, ewc)


def make_sa_step(model, config, alphas_cumprod, tx: optax.GradientTransformation, *, batch_size: int,
                 batch_sharding=None):
    """``step(state: PretrainState, anchor θ*, fisher F, replay_images uint8 [N,H,W,C], replay_labels [N],
    root_key) -> (state, metrics)``: the Selective Amnesia loss of the module docstring, one optimizer step.

    The surrogate and replay halves run as one network call of 2B (per-half means)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    T = int(config.diffusion.num_diffusion_timesteps)
    gamma, lmbda = float(config.training.gamma), float(config.training.lmbda)
    K, B = forget_label(config), int(batch_size)
    res, ch = int(config.data.image_size), int(config.model.in_channels)
    ema_rate = float(config.model.ema_rate)
    constrain = constrainer(batch_sharding)

    def step(state: PretrainState, anchor, fisher, replay_images, replay_labels, root_key):
        k_xf, k_tf, k_ef, k_idx, k_tr, k_er, k_do = jax.random.split(jax.random.fold_in(root_key, state.step), 7)
        shape = (B, res, res, ch)
        x_f = constrain(jax.random.uniform(k_xf, shape, jnp.float32, -1.0, 1.0))
        idx = jax.random.randint(k_idx, (B,), 0, replay_images.shape[0])
        x_r = constrain(to_model_space(replay_images[idx]))
        c_r = constrain(replay_labels[idx].astype(jnp.int32))
        x = jnp.concatenate([x_f, x_r])
        labels = jnp.concatenate([jnp.full((B,), K, jnp.int32), c_r])
        t = jnp.concatenate([constrain(antithetic_timesteps(k_tf, B, T)), constrain(antithetic_timesteps(k_tr, B, T))])
        e = jnp.concatenate([constrain(jax.random.normal(k_ef, shape, jnp.float32)),
                             constrain(jax.random.normal(k_er, shape, jnp.float32))])

        def loss_fn(p):
            return sa_loss(model, p, anchor, fisher, x, labels, t, e, ac, n_forget=B, gamma=gamma, lmbda=lmbda,
                           train=True, rng=k_do)

        (loss, (l_f, l_r, ewc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new = apply_gradients(state, grads, tx, ema_rate)
        return new, {"loss": loss, "forget_loss": l_f, "replay_loss": l_r, "ewc": ewc,
                     "grad_norm": optax.global_norm(grads)}

    return step


def make_replay(model, params, config, alphas_cumprod, *, mesh, progress: bool = True):
    """(images uint8 [N,H,W,C], labels int32 [N]): ``unlearn.n_replay_per_class`` samples of every remaining
    class from ``params`` with the ``unlearn.replay_*`` sampler, seed ``config.seed``."""
    from sfd_jax.ddpm.baselines.common import remain_classes
    from sfd_jax.ddpm.generate import DDPMSampler, generate
    from sfd_jax.ddpm.networks import t_init_of
    from sfd_jax.image_io import to_uint8
    u = config.unlearn
    sampler = DDPMSampler(model, alphas_cumprod, sampler=str(u.replay_sampler), t_init=t_init_of(config),
                          steps=int(u.replay_steps), eta=float(u.replay_eta), cond_scale=float(u.replay_cond_scale),
                          mesh=mesh)
    labels = np.repeat(np.asarray(remain_classes(config), np.int32), int(u.n_replay_per_class))
    res, ch = int(config.data.image_size), int(config.model.in_channels)
    imgs = generate(sampler, params, labels, image_shape=(res, res, ch), batch_size=int(config.sampling.batch_size),
                    seed=int(config.seed), progress=progress)
    return to_uint8(imgs), labels
