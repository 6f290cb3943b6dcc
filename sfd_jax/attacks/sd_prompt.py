r"""The prompt attack on an SD one-step generator (``evaluate attack --kind=prompt``; UnlearnDiffAtk-style).

  python -m sfd_jax.evaluate attack --kind=prompt --checkpoint=WORKDIR/forget_zero_to_one --target=zero \
      --attacker_classifier=WORKDIR/classifier --judge_classifier=WORKDIR/judge --out=OUT \
      [--n=100 --steps=100 --lr=0.005 --budget=0.04 --seed=0]

What it does. The prompts naming the concept (the world's caption templates with the concept's name, "a photo of
a zero", ...; image i uses template i mod T) are tokenised as the generator sees them; the attack adds a change
Δ_j to the text encoder's *input* embedding of every token of each prompt's words (not the start, end or padding
tokens), one Δ per prompt shared by all its images, and maximises the attacker classifier's mean log-probability
of the concept over the n generator images (fixed noises; Adam, ``steps`` steps, learning rate ``lr``; the best
iterate is kept, so the objective never ends below the unattacked one). After
every step each token's change is projected onto ‖Δ_j‖₂ ≤ budget·√D (D = the embedding width), so ``budget`` is
the allowed RMS change per embedding coordinate; the world's token embeddings have an RMS of about 0.02 per
coordinate (the row ``token_norm_rms`` of the result gives the measured value), so budget 0.02 lets each word move
by about its own length.

Reported per budget (``rows``): pre (the unattacked prompts) and post (the optimised embeddings) recognition rates
of the concept by the attacker and by the judge on the attack's noises, post on fresh noises (the same Δ, other
images: does the found prompt *generalise*, or does it fit these n noises), the attacker's objective before and
after, and the change actually used (max and mean ‖Δ_j‖/√D). ``OUT.npz`` holds the images (uint8 NHWC): ``pre``,
``post_<i>`` and ``fresh_<i>`` for budget i.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax.attacks import sd_common
from sfd_jax.attacks.spec import AttackResult, AttackSpec, describe


def prompt_attack(target: sd_common.SDTarget, attacker, judge, concept: int, *, budgets=(0.02,), n: int = 100,
                  steps: int = 100, lr: float = 0.005, seed: int = 0, mesh=None,
                  progress: bool = True) -> tuple[list[dict], dict, dict]:
    """Run the attack for each budget (module docstring). Returns (rows, extra, images): one row per budget,
    ``extra`` = facts shared by the rows (prompts, token count, width), ``images`` = uint8 arrays for OUT.npz."""
    from tqdm.auto import tqdm

    from sfd_jax import parallel
    from sfd_jax.data.captions import class_prompts
    from sfd_jax.image_io import to_uint8
    from sfd_jax.models.classifier import build_classifier
    from sfd_jax.models.clip_text import token_embedding_table
    from sfd_jax.sd.tokenizer import tokenize

    mesh = mesh if mesh is not None else parallel.make_mesh()
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    c = target.comps
    prompts = class_prompts(target.class_names, target.templates, concept, len(target.templates))
    ids = tokenize(c.tokenizer, prompts)                                   # [P, 77]
    table = np.asarray(token_embedding_table(c.text_encoder_params))
    base = jnp.asarray(table[ids])                                         # [P, 77, D]
    mask = jnp.asarray(sd_common.word_mask(ids, c.tokenizer))              # [P, 77, 1]
    dim = int(base.shape[-1])
    m = sd_common.padded(n, mesh)
    pidx = np.arange(m) % len(prompts)
    weight = (np.arange(m) < n).astype(np.float32)
    z = sd_common.pad_rows(sd_common.draw_noise(seed, n, target.latent_shape), m)
    z_fresh = sd_common.pad_rows(sd_common.draw_noise(seed + 1, n, target.latent_shape), m)
    params = jax.device_put({"generator": target.generator_params, "text_encoder": c.text_encoder_params,
                             "vae": c.vae_params}, repl)
    clf_model, clf_vars = build_classifier(attacker.config), jax.device_put(attacker.variables, repl)
    ids_j = jnp.asarray(ids)
    tx = optax.adam(lr)

    def images(delta, params, z, pidx):
        tok = base + delta * mask
        return sd_common.generator_images(target, params, ids_j[pidx], tok[pidx], z)

    def log_p(x, clf_vars):
        return jax.nn.log_softmax(clf_model.apply(clf_vars, x, train=False).astype(jnp.float32))[:, concept]

    def objective(delta, params, clf_vars, z, w, pidx):
        return jnp.sum(w * log_p(images(delta, params, z, pidx), clf_vars)) / jnp.sum(w)

    def evaluate(delta, params, clf_vars, z, w, pidx):
        """(images [m, H, W, C], the objective on them)."""
        x = images(delta, params, z, pidx)
        return x, jnp.sum(w * log_p(x, clf_vars)) / jnp.sum(w)

    def project(delta, radius):
        norm = jnp.sqrt(jnp.sum(delta ** 2, axis=-1, keepdims=True))
        return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12)) * mask

    def step(delta, opt, params, clf_vars, z, w, pidx, radius):
        """(the next Δ, optimiser state, the objective at the given Δ)."""
        obj, g = jax.value_and_grad(objective)(delta, params, clf_vars, z, w, pidx)
        upd, opt = tx.update(jax.tree_util.tree_map(jnp.negative, g), opt, delta)   # ascent on the objective
        return project(optax.apply_updates(delta, upd), radius), opt, obj

    data = (shard, shard, shard)
    step_fn = jax.jit(step, in_shardings=(repl, repl, repl, repl) + data + (repl,), out_shardings=repl,
                      donate_argnums=(1,))
    eval_fn = jax.jit(evaluate, in_shardings=(repl, repl, repl) + data, out_shardings=(shard, repl))
    z, z_fresh, w, pidx = (jax.device_put(a, shard) for a in (z, z_fresh, weight, pidx))
    scorer = sd_common.Scorer(attacker, judge, mesh=mesh)

    def run_eval(delta, noise):
        x, obj = eval_fn(delta, params, clf_vars, noise, w, pidx)
        return to_uint8(np.asarray(jax.device_get(x))[:n]), float(obj)

    zero = jnp.zeros_like(base)
    pre_imgs, pre_obj = run_eval(zero, z)
    pre = scorer.judged(pre_imgs, concept, "pre")
    norms = np.linalg.norm(np.asarray(base), axis=-1)[np.asarray(mask)[..., 0] > 0]
    extra = {"prompts": prompts, "tokens_attacked": int(np.sum(np.asarray(mask))), "embedding_dim": dim,
             "token_norm_rms": float(np.mean(norms) / np.sqrt(dim)), "noise_seed": seed, "fresh_noise_seed": seed + 1}
    rows, out_images = [], {"pre": pre_imgs}
    for i, budget in enumerate(budgets):
        radius = jnp.float32(float(budget) * np.sqrt(dim))
        delta, opt = jnp.zeros_like(base), tx.init(jnp.zeros_like(base))
        best, best_obj = delta, -np.inf
        t0 = time.perf_counter()
        for _ in tqdm(range(int(steps)), desc=f"prompt attack (budget {budget})", disable=not progress,
                      leave=False):
            new, opt, obj = step_fn(delta, opt, params, clf_vars, z, w, pidx, radius)
            if float(obj) > best_obj:   # the best iterate (the objective of ``delta``, before this update)
                best, best_obj = delta, float(obj)
            delta = new
        (post_imgs, post_obj), (fresh_imgs, _) = run_eval(delta, z), run_eval(delta, z_fresh)
        if post_obj < best_obj:         # the last iterate is not the best one: report the best
            delta = best
            (post_imgs, post_obj), (fresh_imgs, _) = run_eval(delta, z), run_eval(delta, z_fresh)
        used = np.linalg.norm(np.asarray(delta), axis=-1)[np.asarray(mask)[..., 0] > 0] / np.sqrt(dim)
        rows.append({"budget": float(budget), "steps": int(steps), "lr": float(lr), **pre,
                     **scorer.judged(post_imgs, concept, "post"), **scorer.judged(fresh_imgs, concept, "post_fresh"),
                     "objective_pre": pre_obj, "objective_post": post_obj,
                     "delta_norm_max": float(used.max()), "delta_norm_mean": float(used.mean()),
                     "seconds": round(time.perf_counter() - t0, 2)})
        out_images[f"post_{i}"], out_images[f"fresh_{i}"] = post_imgs, fresh_imgs
    return rows, extra, out_images


def run_budgets(spec: AttackSpec, budgets, *, progress: bool = True) -> AttackResult:
    """:func:`run` for several budgets on one compiled attack (one row per budget)."""
    t0 = time.perf_counter()
    if spec.kind != "prompt":
        raise ValueError(f"sd_prompt runs kind 'prompt', got {spec.kind!r}")
    if spec.n < 1 or spec.steps < 0 or not spec.lr > 0 or any(not float(b) >= 0 for b in budgets):
        from sfd_jax.cli_utils import UsageError
        raise UsageError(f"--n must be >= 1, --steps >= 0, --lr > 0 and --budget >= 0 (got n={spec.n}, "
                         f"steps={spec.steps}, lr={spec.lr}, budget={list(budgets)})")
    attacker, judge = sd_common.load_classifier_pair(spec)
    model, _ = sd_common.checkpoint_settings(spec.checkpoint)
    names, _, shape = sd_common.world_concepts(model)
    concept = sd_common.resolve_target(spec.target, names)
    sd_common.check_fits(attacker, shape, len(names), "--attacker_classifier")
    sd_common.check_fits(judge, shape, len(names), "--judge_classifier")
    target = sd_common.load_sd_target(spec.checkpoint, spec.weights)
    rows, extra, images = prompt_attack(target, attacker, judge, concept, budgets=tuple(budgets), n=spec.n,
                                        steps=spec.steps, lr=spec.lr, seed=spec.seed, progress=progress)
    res = AttackResult(spec, rows, describe(attacker), describe(judge), time.perf_counter() - t0,
                       extra={**extra, "concept": names[concept], "checkpoint_item": target.item,
                              "checkpoint_step": target.step, "t_init": target.t_init})
    if spec.out:
        res.write()
        np.savez_compressed(spec.out + ".npz", **images)
    return res


def run(spec: AttackSpec, *, progress: bool = True) -> AttackResult:
    """The prompt attack of ``spec`` (module docstring) with budget ``spec.budget``; writes OUT.json, OUT.csv and
    OUT.npz when ``spec.out`` is set."""
    return run_budgets(spec, (spec.budget,), progress=progress)
