r"""Text-to-image training of a Stable Diffusion UNet (``python -m sfd_jax.train`` with ``mode='sd_pretrain'``).

  python -m sfd_jax.train --config=configs/sd_world_pretrain.py --workdir=runs/teacher \
      --config.sd.model=WORLD_BASE [--config.data.dataset=digits|fashion_mnist|PATH.npz]

The UNet of the pipeline folder ``sd.model`` (random weights for a world built here, or SD 1.5 to fine-tune it on
your captions) learns the latent-diffusion objective of :mod:`sfd_jax.sd.pretrain_step` on labelled images
captioned from templates (:mod:`sfd_jax.data.captions`); the VAE and the text encoder stay frozen. The shared host
loop (:mod:`sfd_jax.distill.loop`) drives it on a step schedule, so it is sharded (batch over the mesh, UNet and
Adam state FSDP over ``fsdp``, donated state), resumable (exactly) and stops on a signal like every mode.

Workdir: ``config.json``, ``checkpoints/<step>/`` (items ``model``, ``ema``, ``opt``, config, meta),
``metrics.jsonl`` + ``tb/`` (loss, grad_norm), ``samples/grid_{step}.png`` (EMA UNet, DDIM ``grid_steps`` with
guidance ``grid_guidance``, one row per class). ``python -m sfd_jax.convert export-diffusers --checkpoint=WORKDIR
--base=sd.model --out=DIR`` writes the trained (EMA) UNet into a diffusers pipeline folder.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sfd_jax import parallel
from sfd_jax.cli_utils import UsageError
from sfd_jax.distill.loop import LoopTask, StepSchedule, run_loop
from sfd_jax.distill.run_dir import RunDir, with_shardings
from sfd_jax.distill.state import PretrainState, state_from_items, state_items


def validate_sd_pretrain_config(config) -> None:
    t, o = config.training, config.optim
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"config.dtype must be float32, bfloat16 or float16, got {config.dtype!r}")
    if not config.sd.model:
        raise UsageError("sd.model is required: a diffusers pipeline folder whose UNet is trained")
    for key in ("batch", "n_iters", "log_freq", "snapshot_freq", "grid_per_class", "grid_steps"):
        if int(t[key]) < 1:
            raise UsageError(f"training.{key} must be >= 1, got {t[key]}")
    if not 0.0 <= float(t.caption_dropout) < 1.0:
        raise UsageError(f"training.caption_dropout must be in [0, 1), got {t.caption_dropout}")
    if not 0.0 <= float(t.ema_rate) < 1.0:
        raise UsageError(f"training.ema_rate must be in [0, 1), got {t.ema_rate}")
    if float(o.lr) <= 0:
        raise UsageError(f"optim.lr must be > 0, got {o.lr}")


class SDPretrainTrainer(RunDir):
    """One text-to-image training run in ``workdir`` (created or resumed)."""
    SAME_RECIPE_KEYS = ("mode", "sd.model")

    def __init__(self, config, workdir: str, *, components=None, allow_changes: tuple[str, ...] = ()):
        validate_sd_pretrain_config(config)
        self.data = _open_data(config)          # data errors before any set-up
        self._init_run_dir(config, workdir, allow_changes=allow_changes)
        self.mesh = parallel.mesh_from_config(config)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.repl = parallel.replicated(self.mesh)
        self.min_size = parallel.fsdp_min_size(config)
        B = int(config.training.batch)
        if B % parallel.batch_divisor(self.mesh) or B % jax.process_count():
            raise UsageError(f"training.batch={B} is not a multiple of the {parallel.batch_divisor(self.mesh)} batch "
                             "shards of the mesh")
        self.root_key = jax.random.key(int(config.seed))
        self.comps = components if components is not None else self._load_components()
        self._check_components()
        from sfd_jax.data import BatchStream
        self.stream = BatchStream(self.data.dataset, B, seed=int(config.seed), flip=bool(config.data.random_flip),
                                  process_index=jax.process_index(), process_count=jax.process_count())
        self._ids: dict[str, np.ndarray] = {}
        self.strings = [""] + [c for k in range(self.data.n_classes) for c in self.data.all_captions(k)]
        self.row = {c: i for i, c in enumerate(self.strings)}

    def _load_components(self):
        from sfd_jax.sd.pipeline import load_components
        sd = self.config.sd
        return load_components(sd.model, dtype=jnp.dtype(self.config.dtype), variant=sd.variant or None,
                               attention_impl=sd.attention, remat=bool(sd.remat), put=np.asarray)

    def _check_components(self) -> None:
        c, (h, w, ch) = self.comps, self.data.dataset.image_shape
        if c.schedule.prediction_type != "epsilon":
            raise UsageError(f"{self.config.sd.model}: prediction_type {c.schedule.prediction_type!r}; sd_pretrain "
                             "trains epsilon-prediction models")
        if ch != c.vae.in_channels:
            raise UsageError(f"the images have {ch} channel(s), the VAE of {self.config.sd.model} takes "
                             f"{c.vae.in_channels}")
        factor = 2 ** (len(c.vae.block_out_channels) - 1)
        unit = factor * 2 ** (len(c.unet.block_out_channels) - 1)
        if h % unit or w % unit:
            raise UsageError(f"images of {h}x{w} pixels: this model needs a multiple of {unit}")
        self.latent_shape = (h // factor, w // factor, int(c.unet.in_channels))
        self.alphas_cumprod = np.asarray(c.schedule.alphas_cumprod, np.float32)

    def tokenize(self, captions) -> np.ndarray:
        """Token ids int32 [N, 77] (memoised: template captions repeat)."""
        from sfd_jax.sd.tokenizer import tokenize
        new = sorted({s for s in captions if s not in self._ids})
        if new:
            for s, row in zip(new, tokenize(self.comps.tokenizer, new)):
                self._ids[s] = np.asarray(row, np.int32)
        return np.stack([self._ids[s] for s in captions])

    def text_table(self) -> np.ndarray:
        """Embeddings float32 [N, 77, D] of "" (row 0) and every caption of the data set (``self.strings``)."""
        from sfd_jax.models.clip_text import text_embeddings
        te = self.comps.text_encoder
        encode = jax.jit(lambda p, ids: text_embeddings(te, p, ids))
        ids = self.tokenize(self.strings)
        return np.concatenate([np.asarray(encode(self.comps.text_encoder_params, ids[i:i + 64]))
                               for i in range(0, len(ids), 64)])

    # ------------------------------------------------------------------------------------------- state
    def optimizer(self):
        from sfd_jax.sd.pretrain_step import make_pretrain_optimizer
        o = self.config.optim
        return make_pretrain_optimizer(float(o.lr), beta1=float(o.beta1), beta2=float(o.beta2), eps=float(o.eps),
                                       weight_decay=float(o.weight_decay), grad_clip=float(o.grad_clip))

    def _put(self, tree, shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)

    def build(self):
        """(state, state shardings, frozen inputs, frozen shardings, tx). Fresh from sd.model's UNet, or resumed."""
        from sfd_jax.sd.pipeline import abstract_params
        shapes = abstract_params(self.comps.unet)
        p_sh = parallel.state_shardings(shapes, self.mesh, self.min_size)
        tx = self.optimizer()
        opt_abs = jax.eval_shape(tx.init, shapes)
        sh = PretrainState(step=self.repl, params=p_sh, ema=p_sh,
                           opt=parallel.state_shardings(opt_abs, self.mesh, self.min_size))
        frozen = {"table": self.text_table()}
        frozen_sh = parallel.state_shardings(frozen, self.mesh, self.min_size)
        frozen = self._put(frozen, frozen_sh)
        resume = self.latest_step()
        if resume is None:
            params = self._put(self.comps.unet_params, p_sh)
            copy = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=p_sh)
            opt = jax.jit(tx.init, out_shardings=sh.opt)(params)
            state = PretrainState(step=jax.device_put(jnp.int32(0), self.repl), params=params, ema=copy(params),
                                  opt=opt)
        else:
            abstract = PretrainState(step=None, params=shapes, ema=shapes, opt=opt_abs)
            targets = {k: with_shardings(v, s) for (k, v), s in
                       zip(state_items(abstract).items(), state_items(sh).values())}
            resume, items = self.restore_newest(targets)
            state = state_from_items("pretrain", resume, items).replace(
                step=jax.device_put(jnp.int32(resume), self.repl))
            logging.info("resumed from step %d", resume)
        return state, sh, frozen, frozen_sh, tx

    def settings(self):
        from sfd_jax.sd.pretrain_step import PretrainSettings
        t = self.config.training
        return PretrainSettings(batch=int(t.batch), caption_dropout=float(t.caption_dropout),
                                ema_rate=float(t.ema_rate),
                                num_train_timesteps=int(self.comps.schedule.num_train_timesteps),
                                sample_posterior=bool(t.sample_posterior))

    def make_step(self, sh, frozen_sh, tx):
        from sfd_jax.sd.pretrain_step import make_sd_pretrain_step
        fn = make_sd_pretrain_step(self.comps.unet, float(self.comps.vae.scaling_factor), self.alphas_cumprod,
                                   self.settings(), tx, batch_sharding=self.batch_sharding)
        batch_sh = {"mean": self.batch_sharding, "logvar": self.batch_sharding, "rows": self.batch_sharding}
        return jax.jit(fn, in_shardings=(sh, frozen_sh, batch_sh, self.repl), out_shardings=(sh, self.repl),
                       donate_argnums=(0,))

    def posteriors(self) -> tuple[np.ndarray, np.ndarray]:
        """The VAE posterior (mean, logvar) float32 [N, h, w, 4] of every image, computed once (and memoised)."""
        if getattr(self, "_moments", None) is None:
            from sfd_jax.data import to_model_space
            from sfd_jax.models.vae import AutoencoderKL
            vae = self.comps.vae
            enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
            params = jax.device_put(self.comps.vae_params, self.repl)
            images = self.data.dataset.images
            parts = [enc(params, to_model_space(images[i:i + 256])) for i in range(0, len(images), 256)]
            self._moments = tuple(np.concatenate([np.asarray(p[j], np.float32) for p in parts]) for j in (0, 1))
        return self._moments

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of step ``step``: the images' posterior mean and logvar float32 [B/P, h, w, 4]
        (mirrored along the width where the data stream flips an image) and their text-table rows int32 [B/P]."""
        idx = self.stream.global_indices(step)
        caps = self.data.captions(self.data.dataset.labels[idx], int(self.config.seed), step)
        b = self.stream.local_batch_size
        lo = jax.process_index() * b
        mean, logvar = (m[idx[lo:lo + b]] for m in self.posteriors())
        if self.stream.flip:
            flip = self.stream._flips(step)[lo:lo + b]
            mean = np.where(flip[:, None, None, None], mean[:, :, ::-1], mean)
            logvar = np.where(flip[:, None, None, None], logvar[:, :, ::-1], logvar)
        return {"mean": np.ascontiguousarray(mean), "logvar": np.ascontiguousarray(logvar),
                "rows": np.asarray([self.row[c] for c in caps[lo:lo + b]], np.int32)}

    def device_batch(self, step: int) -> dict:
        host = self.host_batch(step)
        if jax.process_count() == 1:
            return {k: jax.device_put(v, self.batch_sharding) for k, v in host.items()}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in host.items()}

    # ------------------------------------------------------------------------------------------- grids
    def save_grids(self, params, step: int) -> None:
        """``samples/grid_{step}.png``: ``grid_per_class`` images per class (one row each), DDIM with guidance."""
        from sfd_jax.image_io import save_grid
        from sfd_jax.sd.prompt_sampling import TeacherSampler
        t = self.config.training
        per = int(t.grid_per_class)
        if getattr(self, "_grid_sampler", None) is None:
            self._grid_sampler = TeacherSampler(self.comps, self.mesh, steps=int(t.grid_steps),
                                                guidance=float(t.grid_guidance), tokenize=self.tokenize,
                                                latent_shape=self.latent_shape)
        prompts = [self.data.all_captions(c)[0] for c in range(self.data.n_classes) for _ in range(per)]
        images = self._grid_sampler.sample(params, prompts, seed=int(self.config.seed))
        if self.is_main:
            out = os.path.join(self.workdir, "samples")
            os.makedirs(out, exist_ok=True)
            save_grid(images, os.path.join(out, f"grid_{step}.png"), nrow=per)

    # --------------------------------------------------------------------------------------------- run
    def run(self, sigterm_at_step: int | None = None):
        """Train to ``training.n_iters`` (resuming if the workdir has checkpoints); returns the final state."""
        with self.guarded() as stop:
            self.check_resume_config()
            state, sh, frozen, frozen_sh, tx = self.build()
            start = int(jax.device_get(state.step))
            self.write_config(start)
            step_fn = self.make_step(sh, frozen_sh, tx)
            c, t = self.config, self.config.training
            schedule = StepSchedule(total=int(t.n_iters), log_freq=int(t.log_freq),
                                    snapshot_freq=int(t.snapshot_freq), lrs={"lr": float(c.optim.lr)})
            task = LoopTask(name="sd_pretrain",
                            step=lambda st, k: step_fn(st, frozen, self.device_batch(k), self.root_key),
                            items=state_items, grids=lambda st, tag: self.save_grids(st.ema, int(tag)),
                            meta={"mode": "sd_pretrain", "sd_model": c.sd.model, "recipe_seed": int(c.seed)},
                            images_per_step=int(t.batch), postfix_keys=("loss",))
            return run_loop(self, task, schedule, state, start, stop, initial_grids=None,
                            sigterm_at_step=sigterm_at_step)


def _open_data(config):
    from sfd_jax.data.captions import load_world_data
    d = config.data
    try:
        return load_world_data(d.dataset, d.class_names or None, d.templates or None, split=d.split)
    except (OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
