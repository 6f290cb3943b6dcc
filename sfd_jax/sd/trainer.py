"""The Stable Diffusion SFD trainer (``python -m sfd_jax.train`` with ``mode='sd_sfd'``): components and state,
the jitted step (:mod:`sfd_jax.sd.step`), prompt batches and grids, driven by the shared host loop
(:mod:`sfd_jax.distill.loop`) on a kimg-tick schedule (:class:`TickSchedule`).

Workdir layout (as DDPM): ``config.json``, ``checkpoints/<step>/`` (items generator, generator_ema (if EMA),
fake_score, g_opt, sg_opt, config, meta), ``metrics.jsonl`` + ``tb/`` (one record per tick), ``samples/``
(``fakes_init_{k}.png`` and ``fakes_{nimg:09d}_{k}.png``, nimg = images seen, for k generator steps in
``training.grid_steps``). The tick counter is saved with the checkpoint, so a resumed run continues the schedule
(the original restarted it).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sfd_jax import parallel
from sfd_jax.cli_utils import UsageError
from sfd_jax.sd.task import SDPrompts, micro_batch, validate_sd_config
from sfd_jax.distill.state import SDState, state_from_items, state_items
from sfd_jax.distill.loop import Events, LoopTask, run_loop
from sfd_jax.distill.run_dir import RunDir, with_shardings

SPECIAL_SNAPSHOT_TICKS = frozenset({2, 4} | set(range(10, 101, 10)))


class SDTrainer(RunDir):
    """One SD SFD run in ``workdir`` (created or resumed)."""
    SAME_RECIPE_KEYS = ("mode", "sd.resolution", "sd.model")

    def __init__(self, config, workdir: str, *, components=None, allow_changes: tuple[str, ...] = ()):
        validate_sd_config(config)
        self._init_run_dir(config, workdir, allow_changes=allow_changes)
        self.mesh = parallel.mesh_from_config(config)
        self.shards = parallel.batch_divisor(self.mesh)
        self.micro = micro_batch(config, self.shards)
        if jax.process_count() > 1 and self.micro % jax.process_count():
            raise UsageError(f"the micro-batch {self.micro} is not a multiple of {jax.process_count()} processes")
        self.min_size = parallel.fsdp_min_size(config)
        self.repl = parallel.replicated(self.mesh)
        self.root_key = jax.random.key(int(config.seed))
        self.prompts = SDPrompts(config, warn=self._warn)
        self.comps = components if components is not None else self._load_components()
        self._check_components()
        from jax.sharding import NamedSharding, PartitionSpec as P
        from sfd_jax.sd.step import SDStepSettings
        self.step_settings = SDStepSettings.from_config(config, micro=self.micro, latent_shape=self.latent_shape,
                                                        has_neg=self.prompts.has_neg, n_neg=len(self.prompts.neg))
        self.rounds_sharding = NamedSharding(self.mesh, P(None, parallel.BATCH_AXES))  # [R, M, ...] batch arrays
        self.micro_sharding = parallel.batch_sharding(self.mesh)                      # [M, ...] arrays

    # ----------------------------------------------------------------------------------------- set-up
    def _warn(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _load_components(self):
        from sfd_jax.sd.pipeline import load_components
        sd = self.config.sd
        return load_components(sd.model, dtype=jnp.dtype(self.config.dtype), variant=sd.variant or None,
                               attention_impl=sd.attention, remat=bool(sd.remat), put=np.asarray)

    def _check_components(self) -> None:
        c = self.comps
        if c.schedule.prediction_type != "epsilon":
            raise UsageError(f"{self.config.sd.model}: prediction_type {c.schedule.prediction_type!r}; SD SFD needs an "
                             "epsilon-prediction model (SD 1.x), as the original")
        factor = 2 ** (len(c.vae.block_out_channels) - 1)
        res = int(self.config.sd.resolution)
        unit = factor * 2 ** (len(c.unet.block_out_channels) - 1)
        if res % unit:
            raise UsageError(f"sd.resolution={res} must be a multiple of {unit} for this model")
        self.latent_shape = (res // factor, res // factor, int(c.unet.in_channels))
        self.alphas_cumprod = np.asarray(c.schedule.alphas_cumprod, np.float32)

    def tokenize(self, prompts) -> np.ndarray:
        from sfd_jax.sd.tokenizer import tokenize
        return tokenize(self.comps.tokenizer, list(prompts))

    # ------------------------------------------------------------------------------------------- state
    def optimizers(self):
        from sfd_jax.sd.optim import make_sd_optimizer
        o = self.config.optim
        common = dict(beta1=float(o.beta1), beta2=float(o.beta2), eps=float(o.eps),
                      weight_decay=float(o.weight_decay), precision=o.precision, group_below=self.min_size)
        g_tx = make_sd_optimizer(o.optimizer, float(o.glr), clip_value=float(o.g_clip_value) or None, **common)
        sg_tx = make_sd_optimizer(o.optimizer, float(o.lr), clip_value=float(o.sg_clip_value) or None, **common)
        return g_tx, sg_tx

    def _param_shardings(self):
        from sfd_jax.sd.pipeline import abstract_params
        shapes = abstract_params(self.comps.unet)
        return shapes, parallel.state_shardings(shapes, self.mesh, self.min_size)

    def _put(self, tree, shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)

    def _fp16(self, tree):
        if self.config.optim.precision != "fp16_emulated":
            return tree
        from sfd_jax.sd.optim import to_fp16_values
        # one small program, compiled once for the teacher and the generator (eagerly ~5 ops per leaf: 7 s for the
        # tiny UNet)
        return jax.jit(to_fp16_values, static_argnums=1)(tree, self.min_size)

    def _generator_init(self, shapes):
        path = self.config.sd.generator_init
        if not path:
            return None
        from sfd_jax.convert.sd_checkpoints import restore_generator
        try:
            name, step, params = restore_generator(path, shapes)
        except FileNotFoundError as e:
            raise UsageError(f"sd.generator_init: {e}") from None
        logging.info("generator initialised from %s (item %s, step %d)", path, name, step)
        return params

    def build(self):
        """(state, state shardings, frozen inputs, frozen shardings, (g_tx, sg_tx))."""
        shapes, p_sh = self._param_shardings()
        g_tx, sg_tx = self.optimizers()
        te_shapes = jax.eval_shape(lambda: self.comps.text_encoder.init_params(jax.random.key(0)))
        te_sh = parallel.state_shardings(te_shapes, self.mesh, self.min_size)
        teacher = self._put(self._fp16(self.comps.unet_params), p_sh)
        te_params = self._put(self.comps.text_encoder_params, te_sh)
        table = self.text_table(te_params)
        frozen = {"teacher": teacher, "text_encoder": te_params, "table": table}
        frozen_sh = {"teacher": p_sh, "text_encoder": te_sh, "table": self.repl}
        use_ema = float(self.config.training.ema_halflife_kimg) > 0
        g_opt_abs, sg_opt_abs = jax.eval_shape(g_tx.init, shapes), jax.eval_shape(sg_tx.init, shapes)
        sh = SDState(step=self.repl, generator=p_sh, generator_ema=p_sh if use_ema else None, fake_score=p_sh,
                     g_opt=parallel.state_shardings(g_opt_abs, self.mesh, self.min_size),
                     sg_opt=parallel.state_shardings(sg_opt_abs, self.mesh, self.min_size))
        resume = self.latest_step()
        if resume is None:
            copy = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=p_sh)
            init = self._generator_init(shapes)
            gen = self._put(self._fp16(init), p_sh) if init is not None else copy(teacher)
            fake = copy(teacher)   # the fake score starts from the teacher, not from G
            g_opt = jax.jit(g_tx.init, out_shardings=sh.g_opt)(gen)
            sg_opt = jax.jit(sg_tx.init, out_shardings=sh.sg_opt)(fake)
            state = SDState(step=jax.device_put(jnp.int32(0), self.repl), generator=gen,
                            generator_ema=copy(gen) if use_ema else None, fake_score=fake, g_opt=g_opt,
                            sg_opt=sg_opt)
        else:
            abstract = SDState(step=None, generator=shapes, generator_ema=shapes if use_ema else None,
                               fake_score=shapes, g_opt=g_opt_abs, sg_opt=sg_opt_abs)
            targets = {k: with_shardings(v, getattr(sh, k)) for k, v in state_items(abstract).items()}
            resume, items = self.restore_newest(targets, json_items=("meta",))
            self._resume_meta = items.pop("meta")
            state = state_from_items("sd_sfd", resume, items)
            state = state.replace(step=jax.device_put(jnp.int32(resume), self.repl))
            logging.info("resumed from step %d", resume)
        return state, sh, frozen, frozen_sh, (g_tx, sg_tx)

    def text_table(self, te_params) -> jax.Array:
        """Embeddings [N, 77, D] float32 of the fixed strings (row 0 = ""), computed once."""
        from sfd_jax.models.clip_text import text_embeddings
        te = self.comps.text_encoder
        encode = jax.jit(lambda p, ids: text_embeddings(te, p, ids), out_shardings=self.repl)
        ids = self.tokenize(self.prompts.strings)
        chunk = 64
        parts = [encode(te_params, ids[i:i + chunk]) for i in range(0, len(ids), chunk)]  # numpy: same on all hosts
        return jax.device_put(jnp.concatenate(parts), self.repl)

    # -------------------------------------------------------------------------------------------- step
    def settings(self):
        """The step's static settings (:class:`sfd_jax.sd.step.SDStepSettings`)."""
        return self.step_settings

    def make_step(self, sh, frozen_sh, txs):
        from sfd_jax.sd.step import make_sd_sfd_step
        fn = make_sd_sfd_step(self.comps.unet, self.comps.text_encoder, self.alphas_cumprod, self.step_settings,
                              *txs, micro_sharding=self.micro_sharding)
        return jax.jit(fn, in_shardings=(sh, frozen_sh, self.rounds_sharding, self.repl),
                       out_shardings=(sh, self.repl),
                       donate_argnums=(0,))

    def device_batch(self, step: int) -> dict:
        host = self.prompts.host_batch(step, self.step_settings.rounds, self.micro, self.tokenize,
                                       jax.process_index(), jax.process_count())
        if jax.process_count() == 1:
            return {k: jax.device_put(v, self.rounds_sharding) for k, v in host.items()}
        return {k: jax.make_array_from_process_local_data(self.rounds_sharding, v) for k, v in host.items()}

    # ------------------------------------------------------------------------------------------- grids
    def save_grids(self, params, frozen, tag: str) -> None:
        """Grids of the snapshot prompts (2·grid_items images, 8 per row) for k generator steps."""
        from sfd_jax.image_io import save_grid
        from sfd_jax.models.clip_text import text_embeddings
        from sfd_jax.models.vae import decode_latents
        from sfd_jax.sd.generator import generate_latents
        t = self.config.training
        strings = self.prompts.grid_strings(int(t.grid_items), seed=int(t.grid_seed))
        n = len(strings)
        chunk = max(self.shards, min(8, n) // self.shards * self.shards or self.shards)
        pad = -n % chunk
        ids = self.tokenize(strings + [""] * pad)
        key = jax.random.key(int(t.grid_seed))
        z_all = np.asarray(jax.random.normal(key, (n + pad,) + self.latent_shape, jnp.float32))
        if getattr(self, "_grid_fn", None) is None:
            unet, te, vae, ac = self.comps.unet, self.comps.text_encoder, self.comps.vae, self.alphas_cumprod
            t_init = int(self.config.distill.init_timestep)

            def fn(g, te_p, vae_p, ids, z, key, k):
                emb = text_embeddings(te, te_p, ids)
                return decode_latents(vae, vae_p, generate_latents(unet, g, z, emb, ac, t_init, k, key))
            self._grid_fn = jax.jit(fn, static_argnums=(6,))
            self._vae_params = jax.device_put(self.comps.vae_params, self.repl)
        micro_sh = self.micro_sharding
        out_dir = os.path.join(self.workdir, "samples")
        for k in t.grid_steps:
            imgs = []
            for i in range(0, n + pad, chunk):
                out = self._grid_fn(params, frozen["text_encoder"], self._vae_params,
                                    _global(ids[i:i + chunk], micro_sh), _global(z_all[i:i + chunk], micro_sh),
                                    jax.random.fold_in(key, i), int(k))
                imgs.append(_gather(out))
            if self.is_main:
                os.makedirs(out_dir, exist_ok=True)
                save_grid(np.concatenate(imgs)[:n], os.path.join(out_dir, f"fakes_{tag}_{int(k)}.png"),
                          nrow=min(8, n))

    # --------------------------------------------------------------------------------------------- run
    def run(self, sigterm_at_step: int | None = None):
        """Train for ``training.duration_kimg`` (resuming if the workdir has checkpoints); returns the final state.
        Stops early, after saving, on SIGTERM/SIGINT (``self.stop_signal`` says which)."""
        with self.guarded() as stop:
            self.check_resume_config()
            self._resume_meta = {}
            state, sh, frozen, frozen_sh, txs = self.build()
            start = int(jax.device_get(state.step))
            self.write_config(start)
            return self._loop(state, sh, frozen, frozen_sh, txs, start, stop, sigterm_at_step)

    def _loop(self, state, sh, frozen, frozen_sh, txs, start, stop, sigterm_at_step):
        c, t = self.config, self.config.training
        step_fn = self.make_step(sh, frozen_sh, txs)
        B = int(t.batch)
        schedule = TickSchedule.from_config(c, start, self._resume_meta)
        gen = (lambda st: st.generator_ema if st.generator_ema is not None else st.generator)
        task = LoopTask(name="sd_sfd", step=lambda st, k: step_fn(st, frozen, self.device_batch(k), self.root_key),
                        items=state_items, grids=lambda st, tag: self.save_grids(gen(st), frozen, tag),
                        meta={"mode": "sd_sfd", "sd_model": c.sd.model, "generator_init": c.sd.generator_init,
                              "recipe_seed": int(c.seed)},
                        images_per_step=B, grid_tag=lambda step: f"{step * B:09d}",
                        postfix_keys=("sg_remain_loss", "g_remain_loss", "g_forget_loss"))
        return run_loop(self, task, schedule, state, start, stop, initial_grids="init",
                        sigterm_at_step=sigterm_at_step)


class TickSchedule:
    """The SD schedule in images seen (``nimg = step·batch``): a tick after the first step and then every
    ``tick_kimg``; a record per tick; grids and a checkpoint at snapshot ticks (``tick % snap_ticks == 0``, ticks
    2, 4, 10, 20, ..., 100, and the end); a checkpoint at dump ticks. The tick counter travels in the checkpoint's
    meta, so a resumed run continues the schedule."""
    log_on_stop = False

    def __init__(self, config, start: int, resume_meta: dict):
        t = config.training
        self.batch, self.tick_kimg = int(t.batch), float(t.tick_kimg)
        self.snap_ticks, self.dump_ticks = int(t.snap_ticks), int(t.dump_ticks)
        self.total = -(-max(int(float(t.duration_kimg) * 1000), 1) // self.batch)
        self.lrs = {"lr/g": float(config.optim.glr), "lr/sg": float(config.optim.lr)}
        self.tick, self.tick_start_nimg = 0, start * self.batch
        if start > 0:
            self.tick = int(resume_meta.get("tick", 0))
            self.tick_start_nimg = int(resume_meta.get("tick_start_nimg", start * self.batch))

    @classmethod
    def from_config(cls, config, start: int, resume_meta: dict) -> "TickSchedule":
        return cls(config, start, resume_meta)

    def after(self, step: int, seconds: float, steps: int) -> Events:
        nimg = step * self.batch
        done = step >= self.total
        if not (done or self.tick == 0 or nimg >= self.tick_start_nimg + self.tick_kimg * 1000):
            return Events()
        scalars = {"kimg": nimg / 1000.0, "tick": self.tick, "sec_per_tick": seconds,
                   "sec_per_kimg": seconds / max(steps * self.batch / 1000.0, 1e-9), **self.lrs}
        snapshot = done or self.tick % self.snap_ticks == 0 or self.tick in SPECIAL_SNAPSHOT_TICKS
        dump = (done or self.tick % self.dump_ticks == 0) and self.tick != 0
        self.tick += 1
        self.tick_start_nimg = nimg
        return Events(log=True, save=snapshot or dump, grids=snapshot, scalars=scalars)

    def meta(self, step: int) -> dict:
        return {"kimg": step * self.batch / 1000.0, "tick": self.tick, "tick_start_nimg": self.tick_start_nimg}


def _global(x: np.ndarray, sharding):
    """A global array from a host array every process holds in full."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _gather(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
