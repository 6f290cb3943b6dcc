r"""Concept Inversion on an SD one-step generator (``evaluate attack --kind=inversion``).

  python -m sfd_jax.evaluate attack --kind=inversion --checkpoint=WORKDIR/forget_zero_to_one --target=zero \
      --attacker_classifier=WORKDIR/classifier --judge_classifier=WORKDIR/judge --out=OUT \
      [--k=1,8,32 --steps=300 --lr=0.005 --n=100 --seed=0]   # --teacher: default the checkpoint's sd.model

What it does, per k in ``k``:

1. The TEACHER (the pipeline's UNet; ``spec.teacher`` or the checkpoint's ``sd.model``) draws max(k) images of the
   concept as the SD demo samples it (DDIM ``teacher_steps``, guidance ``teacher_guidance``, prompts = the world's
   templates cycled, seed ``seed + 2``); the first k of them are the attacker's data (uint8, as real images would
   be), encoded to VAE latents (posterior mean × scaling factor).
2. Textual inversion: the prompts "<template> with the concept's name replaced by a placeholder token" ("a photo of
   a *"); the placeholder's input embedding is replaced by a learned vector v* (initialised at the placeholder's own
   embedding, which the world never trained on), and only v* is trained (Adam, ``steps`` steps, learning rate
   ``lr``, batches of ``batch``) on the teacher's ε-prediction loss: latents x0 of the k images (drawn with
   replacement), t ~ U{0..999}, x_t = √ā_t·x0 + √(1−ā_t)·ε, mean (ε̂(x_t, t, text(v*)) − ε)². The loss of one fixed
   batch (same images, t, ε) is reported before and after.
3. The UNLEARNED generator is prompted with the placeholder prompts carrying v* (n images, templates cycled) and its
   images are judged; so is the teacher with v* (``teacher_post_*``: did v* capture the concept at all).

Reported per k (``rows``): pre (the plain concept prompts on the generator, the same noises) and post rates by the
attacker and the judge, the teacher's rates with v*, the judge's rate on the k training images, the inversion
loss before and after, and ‖v*‖/√D beside the RMS of the vocabulary's rows. The attacker classifier is not
optimised against here (the attack uses the teacher's images only); both classifiers judge. ``OUT.npz``: the
training images (``train``, uint8 NHWC), ``pre``, ``post_<k>`` and ``teacher_post_<k>``, and ``v_<k>`` (float32 [D]).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfd_jax.attacks import sd_common
from sfd_jax.attacks.spec import AttackResult, AttackSpec, describe
from sfd_jax.cli_utils import UsageError

PLACEHOLDER = "*"


def placeholder_prompts(templates, placeholder: str = PLACEHOLDER) -> list[str]:
    from sfd_jax.data.captions import caption
    return [caption(t, placeholder) for t in templates]


def placeholder_mask(ids: np.ndarray, tokenizer, placeholder: str = PLACEHOLDER) -> np.ndarray:
    """float32 [P, L, 1]: 1 where the placeholder's token sits (exactly once per prompt, else an error)."""
    from sfd_jax.sd.tokenizer import tokenize
    one = tokenize(tokenizer, [placeholder])[0]
    words = one[(one != tokenizer.bos_token_id) & (one != tokenizer.eos_token_id)]
    if len(words) != 1:
        raise UsageError(f"the placeholder {placeholder!r} is {len(words)} tokens for this tokenizer; need one")
    hits = np.asarray(ids) == int(words[0])
    if not np.all(hits.sum(1) == 1):
        raise UsageError(f"every template must hold the placeholder {placeholder!r} once")
    return hits.astype(np.float32)[..., None]


def inversion_attack(target: sd_common.SDTarget, attacker, judge, concept: int, *, ks=(1, 8, 32), n: int = 100,
                     steps: int = 300, lr: float = 0.005, batch: int = 16, teacher_steps: int = 20,
                     teacher_guidance: float = 3.0, seed: int = 0, mesh=None,
                     progress: bool = True) -> tuple[list[dict], dict, dict]:
    """Run Concept Inversion for each k (module docstring). ``target.comps.unet_params`` is the teacher.
    Returns (rows, extra, images) as :func:`sfd_jax.attacks.sd_prompt.prompt_attack`."""
    from tqdm.auto import tqdm

    from sfd_jax import parallel
    from sfd_jax.data.captions import class_prompts
    from sfd_jax.distill.losses import denoising_loss
    from sfd_jax.image_io import to_uint8
    from sfd_jax.models.clip_text import text_embeddings_from_tokens, token_embedding_table
    from sfd_jax.models.vae import encode_to_latents
    from sfd_jax.sd.generator import unet_eps
    from sfd_jax.sd.tokenizer import tokenize

    mesh = mesh if mesh is not None else parallel.make_mesh()
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    c = target.comps
    ks = tuple(int(k) for k in ks)
    kmax = max(ks)
    table = np.asarray(token_embedding_table(c.text_encoder_params))
    dim = int(table.shape[1])
    n_templates = len(target.templates)
    plain = tokenize(c.tokenizer, class_prompts(target.class_names, target.templates, concept, n_templates))
    ph_prompts = placeholder_prompts(target.templates)
    ph_ids = tokenize(c.tokenizer, ph_prompts)                              # [P, 77]
    ph_mask = jnp.asarray(placeholder_mask(ph_ids, c.tokenizer))           # [P, 77, 1]
    ph_base = jnp.asarray(table[ph_ids])
    plain_base = jnp.asarray(table[plain])
    v0 = jnp.asarray(table[int(np.asarray(ph_ids)[np.asarray(ph_mask)[..., 0] > 0][0])])
    params = jax.device_put({"generator": target.generator_params, "teacher": c.unet_params,
                             "text_encoder": c.text_encoder_params, "vae": c.vae_params,
                             "empty_ids": jnp.asarray(tokenize(c.tokenizer, [""]))}, repl)
    ac = jnp.asarray(np.asarray(c.schedule.alphas_cumprod, np.float32))
    n_train_t = int(c.schedule.num_train_timesteps)

    def tokens(v, base, mask):
        return base * (1.0 - mask) + mask * v[None, None, :]

    # 1. the teacher's images of the concept (templates cycled), then their latents
    def teacher_fn(v, params, z, pidx, base, mask, ids):
        tok = tokens(v, base, mask)
        return sd_common.teacher_images(target, params, ids[pidx], tok[pidx], z, steps=teacher_steps,
                                        guidance=teacher_guidance)

    def generator_fn(v, params, z, pidx, base, mask, ids):
        return sd_common.generator_images(target, params, ids[pidx], tokens(v, base, mask)[pidx], z)

    args_sh = (repl, repl, shard, shard, repl, repl, repl)
    teacher_jit = jax.jit(teacher_fn, in_shardings=args_sh, out_shardings=shard)
    generator_jit = jax.jit(generator_fn, in_shardings=args_sh, out_shardings=shard)

    def images(fn, v, z_np, count, base, mask, ids):
        m = sd_common.padded(count, mesh)
        z = jax.device_put(sd_common.pad_rows(z_np, m), shard)
        pidx = jax.device_put(np.arange(m) % n_templates, shard)
        return to_uint8(np.asarray(jax.device_get(fn(v, params, z, pidx, base, mask, ids)))[:count])

    no_mask = jnp.zeros_like(ph_mask)
    n_t = max(kmax, n)   # as many as the judged sets, so the teacher's program compiles once
    train_imgs = images(teacher_jit, v0, sd_common.draw_noise(seed + 2, n_t, target.latent_shape), n_t,
                        plain_base, no_mask, jnp.asarray(plain))[:kmax]
    to_x = lambda u8: u8.astype(np.float32) / 127.5 - 1.0   # noqa: E731  (to_uint8's inverse up to rounding)
    latents = np.asarray(jax.jit(lambda p, x: encode_to_latents(c.vae, p, x))(c.vae_params, to_x(train_imgs)))

    # 2. textual inversion of v* on the teacher's ε-loss
    bsz = sd_common.padded(int(batch), mesh)
    tx = optax.adam(lr)
    ph_ids_j = jnp.asarray(ph_ids)

    def loss_fn(v, params, x0_all, k, key):
        k_i, k_j, k_t, k_e = jax.random.split(key, 4)
        x0 = x0_all[jax.random.randint(k_i, (bsz,), 0, k)]
        j = jax.random.randint(k_j, (bsz,), 0, n_templates)
        t = jax.random.randint(k_t, (bsz,), 0, n_train_t)
        noise = jax.random.normal(k_e, x0.shape, jnp.float32)
        emb = text_embeddings_from_tokens(c.text_encoder, params["text_encoder"], ph_ids_j,
                                          tokens(v, ph_base, ph_mask))[j]
        per = denoising_loss(lambda x_t, tt: unet_eps(c.unet, params["teacher"], x_t, tt, emb), x0, t, noise, ac)
        return jnp.mean(per) / x0[0].size

    def ti_step(v, opt, params, x0_all, k, key):
        loss, g = jax.value_and_grad(loss_fn)(v, params, x0_all, k, key)
        upd, opt = tx.update(g, opt, v)
        return optax.apply_updates(v, upd), opt, loss

    step_jit = jax.jit(ti_step, in_shardings=(repl,) * 6, out_shardings=repl, donate_argnums=(0, 1))

    def fixed_loss(v, k):
        """The loss at v of the fixed evaluation batch (the step's program, its update thrown away)."""
        return float(step_jit(jnp.array(v), tx.init(v), params, x0_all, k, eval_key)[2])
    x0_all = jax.device_put(latents, repl)
    eval_key, train_key = jax.random.key(seed + 3), jax.random.key(seed + 4)

    # 3. pre (plain prompts) and post (v*) on the generator, the same noises
    z_eval = sd_common.draw_noise(seed, n, target.latent_shape)
    pre_imgs = images(generator_jit, v0, z_eval, n, plain_base, no_mask, jnp.asarray(plain))
    scorer = sd_common.Scorer(attacker, judge, mesh=mesh)
    pre = scorer.judged(pre_imgs, concept, "pre")
    norms = np.linalg.norm(table, axis=-1) / np.sqrt(dim)
    extra = {"placeholder": PLACEHOLDER, "prompts": ph_prompts, "embedding_dim": dim,
             "vocab_norm_rms": float(np.mean(norms)), "v_init_norm": float(np.linalg.norm(v0) / np.sqrt(dim)),
             "teacher_steps": int(teacher_steps), "teacher_guidance": float(teacher_guidance),
             "noise_seed": seed, "train_noise_seed": seed + 2}
    out_images = {"train": train_imgs, "pre": pre_imgs}
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        k_j = jnp.int32(k)
        v, opt = jnp.array(v0), tx.init(v0)
        loss_start = fixed_loss(v, k_j)
        for s in tqdm(range(int(steps)), desc=f"concept inversion (k={k})", disable=not progress, leave=False):
            v, opt, _ = step_jit(v, opt, params, x0_all, k_j, jax.random.fold_in(train_key, s))
        loss_end = fixed_loss(v, k_j)
        post_imgs = images(generator_jit, v, z_eval, n, ph_base, ph_mask, ph_ids_j)
        t_imgs = images(teacher_jit, v, z_eval, n, ph_base, ph_mask, ph_ids_j)
        rows.append({"k": k, "steps": int(steps), "lr": float(lr), **pre,
                     **scorer.judged(post_imgs, concept, "post"), **scorer.judged(t_imgs, concept, "teacher_post"),
                     **scorer.judged(train_imgs[:k], concept, "train_images"),
                     "loss_start": loss_start, "loss_end": loss_end,
                     "v_norm": float(np.linalg.norm(np.asarray(v)) / np.sqrt(dim)),
                     "seconds": round(time.perf_counter() - t0, 2)})
        out_images.update({f"post_{k}": post_imgs, f"teacher_post_{k}": t_imgs, f"v_{k}": np.asarray(v)})
    return rows, extra, out_images


def run(spec: AttackSpec, *, progress: bool = True) -> AttackResult:
    """Concept Inversion of ``spec`` (module docstring); writes OUT.json, OUT.csv and OUT.npz when ``spec.out``."""
    t0 = time.perf_counter()
    if spec.kind != "inversion":
        raise ValueError(f"sd_inversion runs kind 'inversion', got {spec.kind!r}")
    if (spec.n < 1 or spec.steps < 0 or not spec.lr > 0 or not spec.k or min(spec.k) < 1 or spec.batch < 1
            or spec.teacher_steps < 1):
        raise UsageError(f"--n, --k, --batch and --teacher_steps must be >= 1, --steps >= 0 and --lr > 0 (got "
                         f"n={spec.n}, k={list(spec.k)}, batch={spec.batch}, teacher_steps={spec.teacher_steps}, "
                         f"steps={spec.steps}, lr={spec.lr})")
    attacker, judge = sd_common.load_classifier_pair(spec)
    model, _ = sd_common.checkpoint_settings(spec.checkpoint)
    model = spec.teacher or model
    if spec.teacher:
        from sfd_jax.cli_utils import check_input_path
        check_input_path(spec.teacher, "--teacher")
    names, _, shape = sd_common.world_concepts(model)
    concept = sd_common.resolve_target(spec.target, names)
    sd_common.check_fits(attacker, shape, len(names), "--attacker_classifier")
    sd_common.check_fits(judge, shape, len(names), "--judge_classifier")
    target = sd_common.load_sd_target(spec.checkpoint, spec.weights, model=model)
    rows, extra, images = inversion_attack(
        target, attacker, judge, concept, ks=spec.k, n=spec.n, steps=spec.steps, lr=spec.lr, batch=spec.batch,
        teacher_steps=spec.teacher_steps, teacher_guidance=spec.teacher_guidance, seed=spec.seed,
        progress=progress)
    res = AttackResult(spec, rows, describe(attacker), describe(judge), time.perf_counter() - t0,
                       extra={**extra, "concept": names[concept], "teacher": model, "checkpoint_item": target.item,
                              "checkpoint_step": target.step, "t_init": target.t_init})
    if spec.out:
        res.write()
        np.savez_compressed(spec.out + ".npz", **images)
    return res
