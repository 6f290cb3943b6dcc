"""The pure Stable Diffusion SFD train step (README: "The original release and our differences" › SD distillation).

``step(state: SDState, frozen, batch, root_key) -> (SDState, metrics)``:

A. **Fake-score update** (G frozen). Per accumulation round: *remain* — remain prompts (encoded here by the frozen
   text encoder), context dropout (p("") = ``context_dropout`` on the positive prompt only), G images from the
   post-dropout prompts, t ~ U{tmin..tmax−1}, ε̂ = fake score with guidance κ1 trained *through* the guided
   output, negatives as unconditional text iff use_neg[0]; *forget* — forget prompts, dropout blanking the
   prompt and its negative, with ``sg_w_override`` + negatives the override prompts replace the forget prompts.
   Per-sample NaN masking; L = Σ_kept Σ_CHW (ε̂ − ε)²·ls / B (global batch B). Gradients are summed over the
   rounds, ``nan_to_num``'d (:func:`sfd_jax.sd.optim.nan_to_num_grads`), and stepped (no clipping unless configured).
B. **Generator update** with the just-updated fake score: fresh remain prompts; SiD loss
   (:func:`sfd_jax.distill.losses.sid_generator_loss`) with the fake score at κ2 and the teacher at κ4 (negatives per
   use_neg[1], use_neg[2]); forget: teacher at the override prompts, fake score at the forget prompts (or the
   override prompts with ``sg_w_override``). Samples with NaN in G's output or the loss are masked;
   L = Σ_kept ℓ·lsg / B; ``nan_to_num``; optional value clipping; step; EMA with half-life and ramp-up.

Text: ``frozen['table']`` [N, 77, D] holds the embeddings of every fixed string (row 0 = "", then the negative
prompts, then forget/override strings); prompt batches index it. Remain prompts arrive as token ids.

Batch (global arrays, leading axes [R rounds, M micro-batch]; M sharded over the mesh's batch axes):
``sg_remain``/``g_remain`` int32 [R, M, 77] token ids; ``sg_forget``, ``sg_override``, ``sg_neg``, ``g_forget``,
``g_override``, ``g_neg`` int32 [R, M] table rows. Random numbers (z, ε, t, dropout, negatives of remain prompts)
come from ``fold_in(root_key, step)``, drawn at micro-batch shape, so 1 device and N devices agree and a resumed
run repeats an uninterrupted one. Latents NHWC float32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sfd_jax.distill.losses import denoising_loss, sid_generator_loss
from sfd_jax.models.clip_text import text_embeddings
from sfd_jax.sd.generator import cfg_guided_eps, generate_latents
from sfd_jax.sd.optim import GROUP_BELOW, apply_updates, nan_to_num_grads
from sfd_jax.distill.state import SDState

PHASE_KEYS = ("sg_remain", "sg_forget", "g_remain", "g_forget")


@dataclasses.dataclass(frozen=True)
class SDStepSettings:
    """Static settings of the step (from the config, see :func:`from_config`)."""
    batch: int                  # global batch B (images per iteration and phase)
    micro: int                  # micro-batch M per accumulation round (global, over all devices)
    latent_shape: tuple         # (h, w, c)
    t_init: int = 625
    num_steps: int = 1
    alpha: float = 1.0
    tmin: int = 20
    tmax: int = 980
    k1: float = 1.0
    k2: float = 1.0
    k4: float = 1.0
    use_neg: tuple = (False, False, True)
    sid_w_neg: bool = False
    sg_w_override: bool = False
    has_neg: bool = False
    n_neg: int = 0              # negative prompts occupy table rows 1..n_neg
    ls: float = 1.0
    lsg: float = 1.0
    sg_remain_coef: float = 1.0
    sg_forget_coef: float = 0.01
    g_remain_coef: float = 1.0
    g_forget_coef: float = 0.01
    dropout_p: float = 0.1
    ema_halflife_kimg: float = 0.0
    ema_rampup: float = 0.05
    precision: str = "fp32"     # fp32 | fp16_emulated (fp16 weights, moments, gradients; sd_optim)
    group_below: int = GROUP_BELOW  # leaves this small are rounded together (sd.optim.map_leaves; FSDP threshold)

    @property
    def rounds(self) -> int:
        return self.batch // self.micro

    @property
    def context_dropout(self) -> bool:
        """The original applies dropout iff cfg_train_fake != 1 or cfg_eval_fake != 1."""
        return self.k1 != 1.0 or self.k2 != 1.0

    @classmethod
    def from_config(cls, config, *, micro: int, latent_shape, has_neg: bool, n_neg: int) -> "SDStepSettings":
        from sfd_jax.data.prompts import parse_use_neg
        from sfd_jax.parallel import fsdp_min_size
        d, t = config.distill, config.training
        return cls(batch=int(t.batch), micro=int(micro), latent_shape=tuple(latent_shape),
                   t_init=int(d.init_timestep), num_steps=int(d.num_steps), alpha=float(d.alpha),
                   tmin=int(d.tmin), tmax=int(d.tmax), k1=float(d.cfg_train_fake), k2=float(d.cfg_eval_fake),
                   k4=float(d.cfg_eval_real), use_neg=parse_use_neg(d.use_neg), sid_w_neg=bool(d.sid_w_neg),
                   sg_w_override=bool(d.sg_w_override), has_neg=bool(has_neg), n_neg=int(n_neg),
                   ls=float(d.ls), lsg=float(d.lsg), sg_remain_coef=float(d.sg_remain_coef),
                   sg_forget_coef=float(d.sg_forget_coef), g_remain_coef=float(d.g_remain_coef),
                   g_forget_coef=float(d.g_forget_coef), dropout_p=float(d.context_dropout),
                   ema_halflife_kimg=float(t.ema_halflife_kimg), ema_rampup=float(t.ema_rampup),
                   precision=str(config.optim.precision), group_below=fsdp_min_size(config))


def ema_beta(step: jax.Array, batch: int, halflife_kimg: float, rampup: float) -> jax.Array:
    """β = 0.5^(B / max(h, 1e-8)), h = min(halflife·1000, nimg·rampup), nimg = step·B before the increment
    (so the first update copies G). float32 scalar."""
    nimg = step.astype(jnp.float32) * batch
    h = jnp.minimum(jnp.float32(halflife_kimg * 1000.0), nimg * rampup) if rampup else \
        jnp.float32(halflife_kimg * 1000.0)
    return jnp.power(jnp.float32(0.5), batch / jnp.maximum(h, 1e-8))


class RoundLosses(NamedTuple):
    """One accumulation round of each phase (exposed for tests and benchmarks).

    ``draws(key) -> dict(z, noise [M,h,w,c], t [M], drop [M] bool, gen_key, neg [M])``: a round's random numbers
    (each phase draws its remain part from ``split(key)[0]`` and its forget part from ``split(key)[1]``).
    ``sg(fake, frozen, g_params, round_batch, key)`` / ``g(g_params, frozen, fake, round_batch, key)`` ->
    (coefficient-weighted loss, [l_remain, l_forget, kept_remain, kept_forget])."""
    draws: Callable
    sg: Callable
    g: Callable


def make_round_losses(unet, text_encoder, alphas_cumprod, s: SDStepSettings,
                      micro_sharding: jax.sharding.Sharding | None = None) -> RoundLosses:
    """The per-round losses of both phases (see the module docstring)."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    M, B = s.micro, s.batch
    shape = (M,) + tuple(s.latent_shape)

    def constrain(x):
        return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

    def draws(key):
        kz, ke, kt, kd, kg, kn = jax.random.split(key, 6)
        return dict(z=constrain(jax.random.normal(kz, shape, jnp.float32)),
                    noise=constrain(jax.random.normal(ke, shape, jnp.float32)),
                    t=constrain(jax.random.randint(kt, (M,), s.tmin, s.tmax)),
                    drop=constrain(jax.random.uniform(kd, (M,)) < s.dropout_p), gen_key=kg,
                    neg=constrain(jax.random.randint(kn, (M,), 1, max(s.n_neg, 1) + 1)))

    def gen(params, z, emb, key):
        return generate_latents(unet, params, z, emb, ac, s.t_init, s.num_steps, key)

    def eps(params, cond, uncond, scale):
        return lambda x_t, t: cfg_guided_eps(unet, params, x_t, t.astype(jnp.int32), cond, uncond, scale)

    def blank(mask, emb, empty):
        return jnp.where(mask[:, None, None], empty, emb)

    def masked_sum(per, scale, extra_ok=None):
        """(Σ of the samples without NaN · scale / B, their count)."""
        ok = ~jnp.isnan(per)
        if extra_ok is not None:
            ok = ok & extra_ok
        return jnp.sum(jnp.where(ok, per, 0.0)) * scale / B, jnp.sum(ok.astype(jnp.int32))

    def remain_neg(table, d):
        return table[d["neg"]] if s.sid_w_neg else None

    def uncond(neg, which, empty):
        """The unconditional text of a guided pass: the negatives where use_neg[which] (and there are any)."""
        return neg if (s.use_neg[which] and neg is not None) else empty

    def x0_ok(x0):
        return ~jnp.any(jnp.isnan(x0), axis=(1, 2, 3))

    # ------------------------------------------------------------------------------- A. fake score, one round
    def sg_round_loss(fake, frozen, g_params, rb, key):
        table = frozen["table"]
        empty = jnp.broadcast_to(table[0], (M,) + table.shape[1:])
        kr, kf = jax.random.split(key)
        d = draws(kr)
        emb = text_embeddings(text_encoder, frozen["text_encoder"], rb["sg_remain"])
        if s.context_dropout:
            emb = blank(d["drop"], emb, empty)           # the remain negative is not blanked
        x0 = jax.lax.stop_gradient(gen(g_params, d["z"], emb, d["gen_key"]))
        per = denoising_loss(eps(fake, emb, uncond(remain_neg(table, d), 0, empty), s.k1), x0, d["t"], d["noise"],
                             ac)
        l_r, n_r = masked_sum(per, s.ls)
        l_f, n_f = jnp.float32(0.0), jnp.int32(0)
        if s.sg_forget_coef > 0:
            d = draws(kf)
            f, o = table[rb["sg_forget"]], table[rb["sg_override"]]
            n = table[rb["sg_neg"]] if s.has_neg else None
            if s.context_dropout:
                if s.has_neg and s.sg_w_override:
                    f = o                                   # generate from and train on the overrides
                f = blank(d["drop"], f, empty)
                if n is not None:
                    n = blank(d["drop"], n, empty)
            x0 = jax.lax.stop_gradient(gen(g_params, d["z"], f, d["gen_key"]))
            per = denoising_loss(eps(fake, f, uncond(n, 0, empty), s.k1), x0, d["t"], d["noise"], ac)
            l_f, n_f = masked_sum(per, s.ls)
        total = s.sg_remain_coef * l_r + s.sg_forget_coef * l_f
        return total, jnp.stack([l_r, l_f, n_r.astype(jnp.float32), n_f.astype(jnp.float32)])

    # ------------------------------------------------------------------------------ B. generator, one round
    def g_round_loss(g_params, frozen, fake, rb, key):
        table, teacher = frozen["table"], frozen["teacher"]
        empty = jnp.broadcast_to(table[0], (M,) + table.shape[1:])
        kr, kf = jax.random.split(key)
        d = draws(kr)
        emb = text_embeddings(text_encoder, frozen["text_encoder"], rb["g_remain"])
        neg = remain_neg(table, d)
        x0 = gen(g_params, d["z"], emb, d["gen_key"])
        per = sid_generator_loss(eps(teacher, emb, uncond(neg, 2, empty), s.k4),
                                 eps(fake, emb, uncond(neg, 1, empty), s.k2), x0, d["t"], d["noise"], ac, s.alpha)
        l_r, n_r = masked_sum(per, s.lsg, x0_ok(x0))
        l_f, n_f = jnp.float32(0.0), jnp.int32(0)
        if s.g_forget_coef > 0:
            d = draws(kf)
            f, o = table[rb["g_forget"]], table[rb["g_override"]]
            n = table[rb["g_neg"]] if s.has_neg else None
            x0 = gen(g_params, d["z"], f, d["gen_key"])
            per = sid_generator_loss(eps(teacher, o, uncond(n, 2, empty), s.k4),
                                     eps(fake, o if s.sg_w_override else f, uncond(n, 1, empty), s.k2), x0, d["t"],
                                     d["noise"], ac, s.alpha)
            l_f, n_f = masked_sum(per, s.lsg, x0_ok(x0))
        total = s.g_remain_coef * l_r + s.g_forget_coef * l_f
        return total, jnp.stack([l_r, l_f, n_r.astype(jnp.float32), n_f.astype(jnp.float32)])

    return RoundLosses(draws, sg_round_loss, g_round_loss)


def make_sd_sfd_step(unet, text_encoder, alphas_cumprod, s: SDStepSettings, g_tx: optax.GradientTransformation,
                     sg_tx: optax.GradientTransformation, *,
                     micro_sharding: jax.sharding.Sharding | None = None) -> Callable:
    """Build the pure step (see the module docstring). ``unet``/``text_encoder``: our Flax modules (the three
    UNets share one module definition); ``micro_sharding``: sharding of [M, ...] arrays (batch axes)."""
    if s.batch % s.micro:
        raise ValueError(f"batch {s.batch} is not a multiple of the micro-batch {s.micro}")
    R, B = s.rounds, s.batch
    losses = make_round_losses(unet, text_encoder, alphas_cumprod, s, micro_sharding)
    sg_round_loss, g_round_loss = losses.sg, losses.g

    def accumulate(loss_fn, params, others, batch, key):
        """Σ over rounds of (grads, [l_r, l_f, kept_r, kept_f]) of ``loss_fn(params, *others, round, key_r)``."""
        grad_fn = jax.grad(loss_fn, has_aux=True)
        if R == 1:
            return grad_fn(params, *others, jax.tree_util.tree_map(lambda x: x[0], batch),
                           jax.random.fold_in(key, 0))

        def body(carry, inp):
            gsum, aux_sum = carry
            rb, r = inp
            g, aux = grad_fn(params, *others, rb, jax.random.fold_in(key, r))
            return (jax.tree_util.tree_map(jnp.add, gsum, g), aux_sum + aux), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (grads, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((4,), jnp.float32)), (batch, jnp.arange(R)))
        return grads, aux

    def step(state: SDState, frozen, batch, root_key):
        k_sg, k_g = jax.random.split(jax.random.fold_in(root_key, state.step))
        frozen = jax.lax.stop_gradient(frozen)
        sg_batch = {k: v for k, v in batch.items() if k.startswith("sg_")}
        g_batch = {k: v for k, v in batch.items() if k.startswith("g_")}

        grads, sg_aux = accumulate(sg_round_loss, state.fake_score,
                                   (frozen, jax.lax.stop_gradient(state.generator)), sg_batch, k_sg)
        grads = nan_to_num_grads(grads, s.precision, s.group_below)
        updates, sg_opt = sg_tx.update(grads, state.sg_opt, state.fake_score)
        fake_score = apply_updates(state.fake_score, updates, s.precision, s.group_below)

        grads, g_aux = accumulate(g_round_loss, state.generator, (frozen, jax.lax.stop_gradient(fake_score)),
                                  g_batch, k_g)
        grads = nan_to_num_grads(grads, s.precision, s.group_below)
        updates, g_opt = g_tx.update(grads, state.g_opt, state.generator)
        generator = apply_updates(state.generator, updates, s.precision, s.group_below)

        ema = state.generator_ema
        if ema is not None:
            beta = ema_beta(state.step, B, s.ema_halflife_kimg, s.ema_rampup)
            ema = jax.tree_util.tree_map(lambda e, p: p + beta * (e - p), ema, generator)
        new = SDState(step=state.step + 1, generator=generator, generator_ema=ema, fake_score=fake_score,
                      g_opt=g_opt, sg_opt=sg_opt)
        metrics = {"sg_remain_loss": sg_aux[0], "sg_forget_loss": sg_aux[1],
                   "g_remain_loss": g_aux[0], "g_forget_loss": g_aux[1],
                   "sg_nan_dropped": B * (1 + (s.sg_forget_coef > 0)) - sg_aux[2] - sg_aux[3],
                   "g_nan_dropped": B * (1 + (s.g_forget_coef > 0)) - g_aux[2] - g_aux[3]}
        return new, metrics

    return step
