"""The host loop behind ``python -m sfd_jax.train``: state creation/restore, the jitted step, logging, checkpoints,
sample grids and preemption. The math lives in :mod:`sfd_jax.ddpm.steps`; this file only drives it."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sfd_jax import parallel
from sfd_jax.ddpm import diffusion
from sfd_jax.cli_utils import UsageError
from sfd_jax.models.ddpm_unet import ConditionalUNet
from sfd_jax.distill.state import (PretrainState, SFDState, make_optimizer, state_from_items, state_items)
from sfd_jax.data import device_put_fn, prefetch
from sfd_jax.distill.loop import LoopTask, StepSchedule, run_loop
from sfd_jax.distill.run_dir import RunDir, with_shardings


def early_stage_steps(snapshot_freq: int, n_intervals: int) -> set[int]:
    """The original's extra snapshots: exp(linspace(log(sf)//k, log(sf), k)) as int64, last dropped.

    With sf=5000, k=15: {1, 3, 6, 11, 20, 38, 70, 129, 238, 438, 805, 1480, 2721} completed steps (the original
    names them ckpt-{completed−1}).
    """
    if n_intervals <= 0:
        return set()
    lg = np.log(snapshot_freq)
    return {int(v) for v in np.exp(np.linspace(lg // n_intervals, lg, n_intervals)).astype(np.int64)[:-1]}


def validate_ddpm_config(config):
    """Fail early, with one line, on DDPM settings (pretraining, SFD, baselines) that cannot run. Returns the
    :class:`~sfd_jax.ddpm.task.DDPMTask` of an SFD config (None for the other modes)."""
    if config.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"config.dtype must be float32 or bfloat16, got {config.dtype!r}")
    t = config.training
    if t.batch_size < 1 or t.n_iters < 1 or t.snapshot_freq < 1 or t.log_freq < 1:
        raise UsageError("training.batch_size, n_iters, snapshot_freq and log_freq must be >= 1")
    from sfd_jax.ddpm.baselines import BASELINE_MODES
    if config.mode in BASELINE_MODES:
        from sfd_jax.ddpm.baseline_trainer import validate_baseline_config
        return validate_baseline_config(config)
    if config.mode == "pretrain" and "optim" not in config:
        raise UsageError("config has no optim section: pretraining needs a *_train.py recipe (e.g. "
                         "configs/cifar10_train.py)")
    if config.mode == "sfd":
        for section in ("distill", "g_optim", "sg_optim"):
            if section not in config:
                raise UsageError(f"config has no {section} section: SFD needs a distillation recipe (e.g. "
                                 "configs/cifar10_sfd.py)")
        from sfd_jax.ddpm.task import DDPMTask
        try:
            task = DDPMTask.from_config(config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        d = config.distill
        if d.get("label_to_override", None) is None and d.pseudo_label_type in ("amax", "prob"):
            if not d.get("use_clf", False) or not d.get("clf_path", ""):
                raise UsageError(f"distill.pseudo_label_type={d.pseudo_label_type!r} needs distill.use_clf=True and "
                                 "distill.clf_path")
            if not os.path.exists(d.clf_path):
                raise FileNotFoundError(f"distill.clf_path {d.clf_path!r} does not exist")
        if not config.init_checkpoint:
            raise UsageError("config.init_checkpoint is empty: SFD starts from a pretrained (or stage-1) checkpoint")
        if not os.path.exists(config.init_checkpoint):
            raise FileNotFoundError(f"config.init_checkpoint {config.init_checkpoint!r} does not exist")
        return task
    return None


class Trainer(RunDir):
    """One training run in ``workdir`` (created or resumed)."""
    SAME_RECIPE_KEYS = ("mode", "model.ch", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
                        "model.in_channels", "model.out_ch", "model.resamp_with_conv", "data.image_size",
                        "data.n_classes")

    def __init__(self, config, workdir: str, *, allow_changes: tuple[str, ...] = ()):
        self.task = validate_ddpm_config(config)   # the SFD labels/timesteps rules (None for other modes)
        self.config = config
        self.mode = config.mode
        self.mesh = parallel.mesh_from_config(config)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.min_size = parallel.fsdp_min_size(config)
        self.repl = parallel.replicated(self.mesh)
        B = int(config.training.batch_size)
        if B % parallel.batch_divisor(self.mesh):
            raise UsageError(f"training.batch_size={B} is not divisible by the {parallel.batch_divisor(self.mesh)} "
                             "batch shards of the mesh")
        self.model = ConditionalUNet.from_config(config)
        _, self.alphas_cumprod = diffusion.schedule_from_config(config)
        self.root_key = jax.random.key(int(config.seed))
        self._init_run_dir(config, workdir, allow_changes=allow_changes)

    # --------------------------------------------------------------------------------------------- state
    def _param_shardings(self):
        shapes = jax.eval_shape(lambda: self.model.init_params(jax.random.key(0)))
        return shapes, parallel.state_shardings(shapes, self.mesh, self.min_size)

    def _put(self, tree, shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)

    def _opt_init(self, tx, params, shardings):
        abstract = jax.eval_shape(tx.init, params)
        opt_sh = parallel.state_shardings(abstract, self.mesh, self.min_size)
        return jax.jit(tx.init, in_shardings=(shardings,), out_shardings=opt_sh)(params), opt_sh

    def build(self):
        """(state, state_shardings, teacher, teacher_shardings, txs). Fresh, from init_checkpoint, or resumed."""
        c = self.config
        shapes, p_sh = self._param_shardings()
        if self.mode == "sfd":
            from sfd_jax.ddpm.init import init_sfd_networks
            g_tx, sg_tx = make_optimizer(c.g_optim, "value"), make_optimizer(c.sg_optim, "value")
            nets = init_sfd_networks(c)
            teacher = self._put(nets["teacher"], p_sh)
            resume = self.latest_step()
            if resume is None:
                gen, fake = self._put(nets["generator"], p_sh), self._put(nets["fake_score"], p_sh)
                g_opt, g_opt_sh = self._opt_init(g_tx, gen, p_sh)
                sg_opt, sg_opt_sh = self._opt_init(sg_tx, fake, p_sh)
                state = SFDState(step=jax.device_put(jnp.int32(0), self.repl), generator=gen, generator_ema=self._put(nets["generator_ema"], p_sh),
                                 fake_score=fake, g_opt=g_opt, sg_opt=sg_opt)
            sh = SFDState(step=self.repl, generator=p_sh, generator_ema=p_sh, fake_score=p_sh,
                          g_opt=parallel.state_shardings(jax.eval_shape(g_tx.init, shapes), self.mesh, self.min_size),
                          sg_opt=parallel.state_shardings(jax.eval_shape(sg_tx.init, shapes), self.mesh, self.min_size))
            abstract = SFDState(step=jax.ShapeDtypeStruct((), jnp.int32), generator=shapes, generator_ema=shapes,
                                fake_score=shapes, g_opt=jax.eval_shape(g_tx.init, shapes),
                                sg_opt=jax.eval_shape(sg_tx.init, shapes))
            txs = (g_tx, sg_tx)
        else:
            tx = make_optimizer(c.optim, "global_norm")
            teacher, resume = None, self.latest_step()
            if resume is None:
                init = jax.jit(self.model.init_params, out_shardings=p_sh)
                params = init(jax.random.fold_in(self.root_key, 0x1417))
                opt, _ = self._opt_init(tx, params, p_sh)
                state = PretrainState(step=jax.device_put(jnp.int32(0), self.repl), params=params,
                                      ema=jax.tree_util.tree_map(jnp.copy, params), opt=opt)
            opt_abs = jax.eval_shape(tx.init, shapes)
            sh = PretrainState(step=self.repl, params=p_sh, ema=p_sh, opt=parallel.state_shardings(opt_abs, self.mesh, self.min_size))
            abstract = PretrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes, ema=shapes, opt=opt_abs)
            txs = (tx,)
        if resume is not None:
            targets = {k: with_shardings(v, s) for (k, v), s in
                       zip(state_items(abstract).items(), state_items(sh).values())}
            resume, items = self.restore_newest(targets)
            state = state_from_items(self.mode, resume, items)
            state = state.replace(step=jax.device_put(jnp.int32(resume), self.repl))
            logging.info("resumed from step %d", resume)
        return state, sh, teacher, txs

    # ---------------------------------------------------------------------------------------------- step
    def make_step(self, sh, txs):
        c = self.config
        if self.mode == "sfd":
            from sfd_jax.ddpm.steps import make_sfd_step
            task = self.task
            fn = make_sfd_step(self.model, c, task, self.alphas_cumprod, *txs,
                               batch_size=int(c.training.batch_size), batch_sharding=self.batch_sharding,
                               fused=bool(c.distill.get("fused", True)),
                               classifier_fn=self._classifier_fn() if task.uses_classifier else None)
            return jax.jit(fn, in_shardings=(sh, sh.generator, self.repl), out_shardings=(sh, self.repl),
                           donate_argnums=(0,))
        from sfd_jax.ddpm.steps import make_pretrain_step
        fn = make_pretrain_step(self.model, c, self.alphas_cumprod, txs[0], batch_sharding=self.batch_sharding)
        return jax.jit(fn, in_shardings=(sh, self.batch_sharding, self.batch_sharding, self.repl),
                       out_shardings=(sh, self.repl), donate_argnums=(0,))

    def _classifier_fn(self):
        """logits(x [B,H,W,C] in [-1,1]) of the evaluation classifier at ``distill.clf_path`` (our checkpoint or a
        torchvision ResNet .pth), weights closed over (replicated), checked against the data's size and classes."""
        from sfd_jax.eval.classifier_train import load_classifier
        d, c = self.config.distill, self.config
        if not d.get("use_clf", False) or not d.get("clf_path", ""):
            raise UsageError(f"distill.pseudo_label_type={d.pseudo_label_type!r} needs distill.use_clf=True and "
                             "distill.clf_path (train one with `python -m sfd_jax.evaluate train-classifier`)")
        clf = load_classifier(d.clf_path, image_size=int(c.data.image_size))
        if clf.config.n_classes != int(c.data.n_classes) or clf.config.image_size != int(c.data.image_size) \
                or clf.config.channels != int(c.model.in_channels):
            raise UsageError(f"classifier {d.clf_path} is for {clf.config.image_size}px x {clf.config.channels} "
                             f"channels, {clf.config.n_classes} classes; the data is {c.data.image_size}px x "
                             f"{c.model.in_channels}, {c.data.n_classes} classes")
        model, variables = clf.model, jax.device_put(clf.variables, self.repl)
        return lambda x: model.apply(variables, x, train=False).astype(jnp.float32)

    # --------------------------------------------------------------------------------------------- grids
    def _grid_sampler(self, param_shardings):
        from sfd_jax.ddpm.networks import t_init_of
        from sfd_jax.ddpm.generate import DDPMSampler
        s = self.config.sampling
        kw = dict(t_init=t_init_of(self.config), mesh=self.mesh, param_shardings=param_shardings)
        if self.mode == "sfd":
            return DDPMSampler(self.model, self.alphas_cumprod, sampler="one_step", **kw)
        return DDPMSampler(self.model, self.alphas_cumprod, sampler=s.grid_sampler, steps=int(s.grid_steps), eta=0.0,
                           cond_scale=float(s.grid_cond_scale), **kw)

    def save_grids(self, sampler, state, step: int) -> None:
        """Grids of the EMA and raw networks, one row per class (README: "The original release and our differences" › DDPM distillation), from the same noise every snapshot."""
        from sfd_jax.ddpm.generate import generate
        from sfd_jax.image_io import save_grid
        n_cls = int(self.config.data.n_classes)
        per = max(1, int(self.config.training.visualization_samples) // n_cls)
        labels = np.repeat(np.arange(n_cls), per)
        res, ch = self.config.data.image_size, self.config.model.in_channels
        nets = ({"ema": state.generator_ema, "raw": state.generator} if self.mode == "sfd"
                else {"ema": state.ema, "raw": state.params})
        out_dir = os.path.join(self.workdir, "samples")
        for name, params in nets.items():
            imgs = generate(sampler, params, labels, image_shape=(res, res, ch),
                            batch_size=int(self.config.sampling.batch_size), seed=int(self.config.seed),
                            progress=False)
            if self.is_main:
                os.makedirs(out_dir, exist_ok=True)
                fname = f"sample-ema-{step}.png" if name == "ema" else f"sample-{step}.png"
                save_grid(imgs, os.path.join(out_dir, fname), nrow=per)

    # ----------------------------------------------------------------------------------------------- run
    def run(self, sigterm_at_step: int | None = None):
        """Train to ``training.n_iters`` (resuming if the workdir has checkpoints); returns the final state.
        Stops early, after saving, on SIGTERM/SIGINT (``self.stop_signal`` says which)."""
        stream = self._stream() if self.mode == "pretrain" else None   # data errors before any set-up
        with self.guarded() as stop:
            self.check_resume_config()
            state, sh, teacher, txs = self.build()
            start = int(jax.device_get(state.step))
            self.write_config(start)
            return self._loop(state, sh, teacher, txs, start, stream, stop, sigterm_at_step)

    def _loop(self, state, sh, teacher, txs, start, stream, stop, sigterm_at_step):
        c = self.config
        batches = (prefetch(stream.iterate(start), size=2, to_device=device_put_fn(self.batch_sharding))
                   if stream is not None else None)
        step_fn = self.make_step(sh, txs)
        if self.mode == "sfd":
            run_step = lambda st, _: step_fn(st, teacher, self.root_key)            # noqa: E731  (data-free)
            lrs = {"lr/g": float(c.g_optim.lr), "lr/sg": float(c.sg_optim.lr)}
        else:
            run_step = lambda st, _: step_fn(st, *next(batches), self.root_key)     # noqa: E731
            lrs = {"lr": float(c.optim.lr)}
        snap = int(c.training.snapshot_freq)
        schedule = StepSchedule(total=int(c.training.n_iters), log_freq=int(c.training.log_freq), snapshot_freq=snap,
                                extra=frozenset(early_stage_steps(snap, int(c.training.get("early_stage_n_intervals", 0)))),
                                lrs=lrs)
        sampler = self._grid_sampler(sh.generator if self.mode == "sfd" else sh.params)
        task = LoopTask(name=self.mode, step=run_step, items=state_items,
                        grids=lambda st, tag: self.save_grids(sampler, st, int(tag)),
                        meta={"mode": self.mode, "init_checkpoint": c.init_checkpoint, "recipe_seed": int(c.seed)},
                        images_per_step=int(c.training.batch_size),
                        close=batches.close if batches is not None else (lambda: None))
        return run_loop(self, task, schedule, state, start, stop, sigterm_at_step=sigterm_at_step)

    def _stream(self):
        """The batch stream of the pretraining data (any failure to open or use it: one line naming the file)."""
        from sfd_jax.data import BatchStream, dataset_from_config
        where = self.config.data.get("path", "") or self.config.data.dataset
        try:
            ds = dataset_from_config(self.config)
            return BatchStream.from_config(ds, self.config, process_index=jax.process_index(),
                                           process_count=jax.process_count())
        except (ValueError, OSError) as e:
            line = str(e).splitlines()[0]
            raise UsageError(line if where in line else f"{where}: {line}") from None
