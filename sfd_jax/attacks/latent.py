"""The latent attack: a white-box gradient search over a DDPM model's input noise for samples of the forgotten class.

For ``n`` samples conditioned on the target class, a per-sample change δ of the input noise is optimised to maximise
the ATTACKER classifier's log-probability of the target on the model's output:

    maximise  Σ_i log p_attacker(target | clip(S(z_i + δ_i, target), −1, 1))   s.t.  ‖δ_i‖₂ ≤ budget·√dim,

with S the model's sampler (:mod:`sfd_jax.attacks.ddpm_model`): the one-step generator x0 = G(z) for an SFD
checkpoint; deterministic DDIM with guidance from x_T for a teacher or a baseline (the gradient flows through
every sampler step, each step's network call rematerialised). z_i: the standard-normal noise of sample i (seed
``spec.seed``); dim = H·W·C, so ``budget`` is the largest RMS change per noise entry (the noise's own RMS is 1).
Optimiser: Adam (``spec.lr``) for ``spec.steps`` steps from δ = 0, each step followed by the projection onto the
ball (PGD); the last iterate is reported. Pre / post: the share of the n samples (uint8-quantised) that the
attacker and the independent judge recognise as the target, before (δ = 0) and after the attack; ``OUT.npz``
holds both image sets (``pre``, ``post``: uint8 NHWC).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from sfd_jax.attacks.ddpm_model import (check_classifiers_fit, classifier_log_prob, initial_noise,
                                        load_attacked_model, load_classifiers, recognised, recognised_as,
                                        target_class)
from sfd_jax.attacks.spec import AttackResult, AttackSpec, describe
from sfd_jax.cli_utils import UsageError
from sfd_jax.image_io import to_uint8

# Rematerialise the DDIM steps' network calls when a batch's image-evaluations (samples × NFE) exceed this: below it
# the activations of the whole trajectory fit in a few GB (8x8 digits UNet: ~1 GB at 32 samples × 40 NFE).
REMAT_ABOVE = 2048


def project(delta: jax.Array, radius: float) -> jax.Array:
    """Scale every sample of ``delta`` [B,...] with ‖δ_i‖₂ > radius back onto the sphere of that radius."""
    norm = jnp.sqrt(jnp.sum(delta.reshape(delta.shape[0], -1) ** 2, -1))
    scale = jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))
    return delta * scale.reshape((-1,) + (1,) * (delta.ndim - 1))


def make_attack_step(sample_fn, log_prob, target: int, radius: float, tx: optax.GradientTransformation, mesh):
    """jit ``step(params, clf_vars, z0, labels, delta, opt) -> (delta, opt, logp [B])``: one Adam step on −Σ log p
    (logp: before the step), then the projection. Batch arrays split over the mesh, parameters replicated."""
    from sfd_jax import parallel

    def step(params, clf_vars, z0, labels, delta, opt):
        def loss(d):
            lp = log_prob(clf_vars, sample_fn(params, z0 + d, labels), target)
            return -jnp.sum(lp), lp
        (_, lp), g = jax.value_and_grad(loss, has_aux=True)(delta)
        upd, opt = tx.update(g, opt, delta)
        return project(optax.apply_updates(delta, upd), radius), opt, lp

    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    opt_sh = jax.tree_util.tree_map(lambda a: batch if getattr(a, "ndim", 0) else repl,
                                    tx.init(jnp.zeros((1,), jnp.float32)))
    return jax.jit(step, in_shardings=(repl, repl, batch, batch, batch, opt_sh),
                   out_shardings=(batch, opt_sh, batch), donate_argnums=(4, 5))


def check_spec(spec: AttackSpec) -> None:
    if spec.n < 1 or spec.steps < 0:
        raise UsageError(f"--n must be >= 1 and --steps >= 0, got n={spec.n}, steps={spec.steps}")
    if not spec.budget > 0 or not spec.lr > 0:
        raise UsageError(f"--budget and --lr must be > 0, got budget={spec.budget}, lr={spec.lr}")


def run(spec: AttackSpec, *, progress: bool = True) -> AttackResult:
    """Run the latent attack of ``spec`` on its checkpoint; returns the result (one row; ``extra['objective']``:
    the attacker's mean log-probability of the target at every step, the last entry after the final step)."""
    from sfd_jax import parallel

    check_spec(spec)
    attacker, judge = load_classifiers(spec)                    # refused before any sampling
    t0 = time.perf_counter()
    am = load_attacked_model(spec)
    check_classifiers_fit(am, attacker, judge)
    target = target_class(spec, am.n_classes)
    mesh = parallel.make_mesh()
    mult = parallel.batch_divisor(mesh)
    n_pad = -(-spec.n // mult) * mult
    dim = int(np.prod(am.image_shape))
    radius = float(spec.budget) * float(np.sqrt(dim))

    sample_fn = am.sample_fn(remat=am.sampler != "one_step" and n_pad * am.nfe > REMAT_ABOVE)
    log_prob = classifier_log_prob(attacker)
    tx = optax.adam(spec.lr)
    step = make_attack_step(sample_fn, log_prob, target, radius, tx, mesh)
    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    draw = jax.jit(sample_fn, in_shardings=(repl, batch, batch), out_shardings=batch)
    score = jax.jit(lambda v, x: log_prob(v, x, target), in_shardings=(repl, batch), out_shardings=batch)

    z0 = jax.device_put(initial_noise(spec.seed, n_pad, am.image_shape), batch)
    labels = jax.device_put(np.full((n_pad,), target, np.int32), batch)
    clf_vars = jax.device_put(attacker.variables, repl)
    delta = jax.device_put(np.zeros((n_pad,) + am.image_shape, np.float32), batch)
    opt = jax.device_put(tx.init(delta), jax.tree_util.tree_map(lambda a: batch if a.ndim else repl,
                                                                tx.init(delta)))
    x_pre = np.asarray(draw(am.params, z0, labels))[: spec.n]
    objective = []
    for _ in tqdm(range(spec.steps), desc="latent attack", unit="step", disable=not progress):
        delta, opt, lp = step(am.params, clf_vars, z0, labels, delta, opt)
        objective.append(float(np.mean(np.asarray(lp)[: spec.n])))
    x_post_dev = draw(am.params, z0 + delta, labels)
    objective.append(float(np.mean(np.asarray(score(clf_vars, x_post_dev))[: spec.n])))
    x_post = np.asarray(x_post_dev)[: spec.n]
    d = np.asarray(delta)[: spec.n].reshape(spec.n, -1)
    rms = np.sqrt(np.sum(d ** 2, -1)) / np.sqrt(dim)
    row = {"budget": float(spec.budget), "steps": int(spec.steps), "lr": float(spec.lr), "n": int(spec.n),
           "pre_judge": recognised(judge, x_pre, target), "post_judge": recognised(judge, x_post, target),
           "pre_attacker": recognised(attacker, x_pre, target), "post_attacker": recognised(attacker, x_post, target),
           "mean_delta_rms": float(rms.mean()), "max_delta_rms": float(rms.max()),
           "objective_pre": objective[0] if spec.steps else objective[-1], "objective_post": objective[-1],
           "sampler": am.sampler, "nfe_per_image": am.nfe,
           "post_judge_recognised_as": recognised_as(judge, x_post),
           "post_attacker_recognised_as": recognised_as(attacker, x_post)}
    wall = time.perf_counter() - t0
    row["wall_seconds"] = round(wall, 2)
    return AttackResult(spec, [row], describe(attacker), describe(judge), wall,
                        extra={"model": am.describe(), "target_class": target, "objective": objective,
                               "noise_dim": dim, "radius_l2": radius},
                        arrays={"pre": to_uint8(x_pre), "post": to_uint8(x_post)})
