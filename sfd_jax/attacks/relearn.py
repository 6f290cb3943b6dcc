"""The relearning attack: fine-tune a copy of the unlearned network on k real images of the forgotten class and
count the steps until the class comes back.

For every k in ``spec.k``: k images of the target class from the ``train`` split of the checkpoint's dataset (a
permutation from ``spec.seed``; the k = 1 image is among the k = 8 ones, and so on), a fresh copy of the network's
weights, Adam (``spec.lr``, β 0.9/0.999, no clipping, no EMA), batches of ``spec.batch`` images drawn with
replacement from the k, fresh timesteps and noise every step, up to ``spec.steps`` steps. Every
``spec.eval_every`` steps (and at step 0) the current weights draw ``spec.n`` samples of the target (the same noise
each time, the model's own sampler, :mod:`sfd_jax.attacks.ddpm_model`) and both classifiers score them; the row of
k holds the first evaluated step at which the JUDGE recognises ≥ 50 % (None: never within ``steps``), the same
for the attacker, and the curve. A k stops at its first evaluation with ≥ 50 % by the judge.

Objective, per model type:
  * a multi-step DDPM (a teacher or a baseline: retrain, SA, SalUn, ESD): the ε-prediction loss it was trained
    with, conditioned on the target label: Σ_HWC (ε − ε̂(x_t, t, target))², x_t = √ā_t x0 + √(1 − ā_t) ε,
    t ~ U{0..T−1}, ε ~ N(0, I), no label dropout, dropout off.
  * SFD's one-step generator: it is the teacher's denoiser evaluated at its fixed timestep t_init
    (x0 = G(z) = x̂0(√(1 − ā) z, t_init)), so the denoiser is trained on the real images at that timestep:
    x_t = √ā x0 + √(1 − ā) ε, x̂0 = (x_t − √(1 − ā) ε̂(x_t, t_init, target)) / √ā regressed to x0,
    Σ_HWC (x̂0 − x0)². This is the same network, the same label and the same timestep the generator uses, so it
    is the denoising objective the generator's weights were initialised from, restricted to the generator's one
    timestep — the direct way to put the class back into those weights with real images (regressing G(z) to
    the k images for random z would teach it a blurred average of them instead).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from sfd_jax.attacks.ddpm_model import (AttackedModel, check_classifiers_fit, initial_noise, load_attacked_model,
                                        load_classifiers, recognised, recognised_as, target_class)
from sfd_jax.attacks.spec import AttackResult, AttackSpec, describe
from sfd_jax.cli_utils import UsageError
from sfd_jax.image_io import to_uint8

THRESHOLD = 0.5


def relearn_loss(am: AttackedModel, target: int):
    """``loss(params, x0 [B,H,W,C], t [B] int, noise [B,H,W,C]) -> scalar`` (batch mean of the per-sample sum; see
    the module docstring: ε-loss at t for a multi-step model, x̂0-regression at t_init for a one-step generator)."""
    from sfd_jax.ddpm import diffusion
    from sfd_jax.distill.losses import denoising_loss
    ac = jnp.asarray(am.alphas_cumprod, jnp.float32)
    model, one_step, t_init = am.model, am.sampler == "one_step", am.t_init

    def loss(params, x0, t, noise):
        labels = jnp.full((x0.shape[0],), target, jnp.int32)
        eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, 0.0)
        if not one_step:
            return jnp.mean(denoising_loss(eps_fn, x0, t, noise, ac))
        a = ac[t_init]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
        x0_hat = diffusion.eps_to_x0(x_t, eps_fn(x_t, jnp.full((x0.shape[0],), t_init, jnp.float32)), a)
        return jnp.mean(jnp.sum((x0_hat - x0) ** 2, axis=(1, 2, 3)))
    return loss


def make_relearn_step(am: AttackedModel, target: int, tx: optax.GradientTransformation, batch_size: int, mesh):
    """jit ``step(params, opt, images_k [k,H,W,C] data space, key) -> (params, opt, loss)``: a batch drawn with
    replacement from the k images, t ~ U{0..T−1}, ε ~ N(0, I), one Adam step. Parameters, optimizer state and the
    k images replicated; the drawn batch constrained to the batch sharding."""
    from sfd_jax import parallel
    loss_fn = relearn_loss(am, target)
    n_t = len(am.alphas_cumprod)
    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def step(params, opt, images, key):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
        x0 = jax.lax.with_sharding_constraint(images[idx], batch)
        t = jax.random.randint(k_t, (batch_size,), 0, n_t)
        noise = jax.lax.with_sharding_constraint(jax.random.normal(k_eps, x0.shape, x0.dtype), batch)
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, t, noise)
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    return jax.jit(step, in_shardings=(repl, repl, repl, repl), out_shardings=(repl, repl, repl),
                   donate_argnums=(0, 1))


def target_images(config, target: int, k_max: int, seed: int) -> np.ndarray:
    """float32 [k_max, H, W, C] in [-1, 1]: the first k_max of a seeded permutation of the train split's images of
    ``target`` (the checkpoint's ``data.dataset``)."""
    from sfd_jax.data import DatasetError, load_dataset
    from sfd_jax.data.images import to_model_space
    name = str(config.data.dataset)
    try:
        ds = load_dataset(name, config.data.get("path", None) or None, split="train",
                          image_size=int(config.data.image_size), channels=int(config.model.in_channels))
    except DatasetError as e:
        raise UsageError(f"relearn needs real images of the target: {e}") from None
    idx = np.flatnonzero(ds.labels == target)
    if len(idx) < k_max:
        raise UsageError(f"--k={k_max} needs {k_max} train images of class {target}; {name} has {len(idx)}")
    pick = idx[np.random.default_rng(seed).permutation(len(idx))[:k_max]]
    return np.asarray(to_model_space(ds.images[pick]), np.float32)


def check_spec(spec: AttackSpec) -> None:
    if spec.n < 1 or spec.steps < 0 or spec.eval_every < 1 or spec.batch < 1:
        raise UsageError(f"--n, --eval_every and --batch must be >= 1 and --steps >= 0, got n={spec.n}, "
                         f"eval_every={spec.eval_every}, batch={spec.batch}, steps={spec.steps}")
    if not spec.k or min(spec.k) < 1:
        raise UsageError(f"--k must be a list of image counts >= 1, got {spec.k}")
    if not spec.lr > 0:
        raise UsageError(f"--lr must be > 0, got {spec.lr}")


def run(spec: AttackSpec, *, progress: bool = True) -> AttackResult:
    """Run the relearning attack of ``spec`` for every k; one row per k, the curves in ``extra['curves']``
    ({k: [[step, judge, attacker, mean loss since the last evaluation], ...]})."""
    from sfd_jax import parallel
    from sfd_jax.ddpm.generate import DDPMSampler

    check_spec(spec)
    attacker, judge = load_classifiers(spec)                    # refused before any sampling
    t_start = time.perf_counter()
    am = load_attacked_model(spec)
    check_classifiers_fit(am, attacker, judge)
    target = target_class(spec, am.n_classes)
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    images = target_images(am.config, target, max(spec.k), spec.seed)
    mult = parallel.batch_divisor(mesh)
    bs = -(-spec.batch // mult) * mult
    tx = optax.adam(spec.lr)
    step = make_relearn_step(am, target, tx, bs, mesh)
    sampler = DDPMSampler(am.model, am.alphas_cumprod, sampler=am.sampler, t_init=am.t_init, steps=am.ddim_steps,
                          eta=0.0, cond_scale=am.cond_scale, mesh=mesh)
    n_pad = -(-spec.n // mult) * mult
    noise = initial_noise(spec.seed, n_pad, am.image_shape)
    labels = np.full((n_pad,), target, np.int32)

    last = {}

    def evaluate(params):
        x = np.asarray(sampler(params, noise, labels, jax.random.key(0)))[: spec.n]
        last["x"] = x
        return recognised(judge, x, target), recognised(attacker, x, target)

    rows, curves, arrays = [], {}, {}
    for k in spec.k:
        t0 = time.perf_counter()
        params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), am.params)
        params = jax.device_put(params, repl)
        opt = jax.device_put(tx.init(params), repl)
        imgs_k = jax.device_put(images[:k], repl)
        key = jax.random.fold_in(jax.random.key(spec.seed), k)
        j, a = evaluate(params)
        curve = [[0, j, a, None]]
        losses: list = []
        hit_j = 0 if j >= THRESHOLD else None
        hit_a = 0 if a >= THRESHOLD else None
        bar = tqdm(total=spec.steps, desc=f"relearn k={k}", unit="step", disable=not progress or hit_j is not None)
        s = 0
        while hit_j is None and s < spec.steps:
            params, opt, loss = step(params, opt, imgs_k, jax.random.fold_in(key, s))
            losses.append(loss)
            s += 1
            bar.update(1)
            if s % spec.eval_every == 0 or s == spec.steps:
                j, a = evaluate(params)
                curve.append([s, j, a, float(np.mean(jax.device_get(losses)))])
                losses = []
                bar.set_postfix(judge=f"{j:.2f}", attacker=f"{a:.2f}")
                if hit_a is None and a >= THRESHOLD:
                    hit_a = s
                if j >= THRESHOLD:
                    hit_j = s
        bar.close()
        rows.append({"k": int(k), "steps_to_50_judge": hit_j, "steps_to_50_attacker": hit_a,
                     "pre_judge": curve[0][1], "post_judge": curve[-1][1], "pre_attacker": curve[0][2],
                     "post_attacker": curve[-1][2], "steps_run": s, "max_steps": int(spec.steps),
                     "eval_every": int(spec.eval_every), "lr": float(spec.lr), "batch": int(bs), "n": int(spec.n),
                     "loss_first": next((c[3] for c in curve if c[3] is not None), None),
                     "loss_last": curve[-1][3],
                     "post_judge_recognised_as": recognised_as(judge, last["x"]),
                     "post_attacker_recognised_as": recognised_as(attacker, last["x"]),
                     "wall_seconds": round(time.perf_counter() - t0, 2)})
        curves[str(k)] = curve
        arrays[f"k{k}"] = to_uint8(last["x"])
    wall = time.perf_counter() - t_start
    return AttackResult(spec, rows, describe(attacker), describe(judge), wall,
                        extra={"model": am.describe(), "target_class": target, "threshold": THRESHOLD,
                               "curves": curves, "objective": "x0_regression_at_t_init" if am.sampler == "one_step"
                               else "eps_prediction"}, arrays=arrays)
