"""The baselines' adapters of the one host loop (modes ``retrain``, ``sa_fim``, ``sa``, ``salun_mask``, ``salun``,
``esd``; the steps live in :mod:`sfd_jax.ddpm.baselines`).

Networks train in a :class:`PretrainState` (items ``model``, ``ema``, ``opt``), so ``sample`` and ``evaluate`` read
a baseline's checkpoint as they read a pretrained DDPM (multi-step DDIM, guidance by ``--cond_scale``). The frozen
copy (Selective Amnesia's θ*, ESD's θ₀) is re-read from ``init_checkpoint`` on every start, never checkpointed.
The artifact modes accumulate in an :class:`AccumState` (item ``acc``; the Fisher pass's :class:`FisherState` adds
``partial``) over a fixed pass of samples — one checkpointable unit of work per step, resumed exactly — and
write their artifact when the pass is complete:
``sa_fim`` -> ``WORKDIR/replay.npz`` (before the pass) and ``WORKDIR/fisher.npz``; ``salun_mask`` ->
``WORKDIR/mask.npz``.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sfd_jax import parallel
from sfd_jax.cli_utils import UsageError
from sfd_jax.data import device_put_fn, prefetch
from sfd_jax.ddpm.baselines import ARTIFACT_MODES, BASELINE_MODES
from sfd_jax.ddpm.baselines.common import (AccumState, FisherState, forget_label, load_tree, remain_classes,
                                           resolve_artifact, save_tree)
from sfd_jax.ddpm.trainer import Trainer
from sfd_jax.distill.loop import LoopTask, StepSchedule, run_loop
from sfd_jax.distill.run_dir import with_shardings
from sfd_jax.distill.state import PretrainState, make_optimizer, state_from_items, state_items


def validate_baseline_config(config) -> None:
    """One-line errors for a baseline config, before anything is built (the artifact trees are checked against
    the model in :meth:`BaselineTrainer.run`, still before anything is written)."""
    u = config.get("unlearn")
    if u is None or "label_to_forget" not in u:
        raise UsageError(f"mode {config.mode!r} needs an unlearn section with label_to_forget (a baseline recipe, "
                         "e.g. configs/cifar10_sa.py)")
    n = int(config.data.n_classes)
    if not 0 <= forget_label(config) < n:   # forget_label: a tuple of several classes is refused in one line
        raise UsageError(f"unlearn.label_to_forget={u.label_to_forget} is outside [0, {n})")
    if "optim" not in config:
        raise UsageError(f"mode {config.mode!r} needs an optim section (the baselines train with the pretraining "
                         "optimizer)")
    if config.mode == "retrain":
        return
    if not config.init_checkpoint:
        raise UsageError(f"config.init_checkpoint is empty: {config.mode} starts from a pretrained checkpoint")
    if not os.path.exists(config.init_checkpoint):
        raise UsageError(f"config.init_checkpoint {config.init_checkpoint!r} does not exist")
    if config.mode in ("sa_fim", "sa"):
        from sfd_jax.ddpm.baselines.sa import fisher_timesteps
        for key in ("gamma", "lmbda"):
            if key not in config.training:
                raise UsageError(f"Selective Amnesia needs training.{key}")
        try:
            fisher_timesteps(config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if config.mode == "sa":
            fisher = resolve_artifact(u.fisher_path, "fisher.npz", "unlearn.fisher_path")
            resolve_artifact(os.path.dirname(fisher), "replay.npz", "the replay set beside unlearn.fisher_path")
    if config.mode in ("salun_mask", "salun"):
        from sfd_jax.ddpm.baselines.salun import METHODS
        if u.method not in METHODS:
            raise UsageError(f"unlearn.method must be one of {', '.join(METHODS)}, got {u.method!r}")
        if not 0.0 < float(u.mask_ratio) <= 1.0:
            raise UsageError(f"unlearn.mask_ratio must be in (0, 1], got {u.mask_ratio}")
        if config.mode == "salun" and u.mask_path:
            resolve_artifact(u.mask_path, "mask.npz", "unlearn.mask_path")
    if config.mode == "esd":
        from sfd_jax.ddpm.baselines.esd import esd_schedule
        try:
            esd_schedule(config)
        except ValueError as e:
            raise UsageError(str(e)) from None


class BaselineTrainer(Trainer):
    """One baseline run in ``workdir`` (created or resumed), driven by :func:`run_loop`."""

    def __init__(self, config, workdir: str, *, allow_changes: tuple[str, ...] = ()):
        if config.mode not in BASELINE_MODES:
            raise UsageError(f"not a baseline mode: {config.mode!r}")
        super().__init__(config, workdir, allow_changes=allow_changes)
        self.forget = forget_label(config)

    # ------------------------------------------------------------------------------------------- inputs
    def _dataset(self):
        from sfd_jax.data import dataset_from_config
        where = self.config.data.get("path", "") or self.config.data.dataset
        try:
            return dataset_from_config(self.config)
        except (ValueError, OSError) as e:
            line = str(e).splitlines()[0]
            raise UsageError(line if where in line else f"{where}: {line}") from None

    def _inputs(self) -> dict:
        """Data and artifacts, read (and checked against the model) before any set-up."""
        c, out = self.config, {}
        shapes = self._param_shardings()[0]
        if self.mode in ("retrain", "salun", "salun_mask"):
            ds = self._dataset()
            if not np.isin(self.forget, ds.labels) and self.mode != "retrain":
                raise UsageError(f"{c.data.dataset}: no image of the forgotten class {self.forget}")
            out["dataset"] = ds
        if self.mode == "sa":
            path = resolve_artifact(c.unlearn.fisher_path, "fisher.npz", "unlearn.fisher_path")
            out["fisher"] = load_tree(path, shapes, "Fisher file")
            with np.load(os.path.join(os.path.dirname(path), "replay.npz")) as z:
                out["replay"] = (z["images"], z["labels"].astype(np.int32))
        if self.mode == "salun" and c.unlearn.mask_path:
            path = resolve_artifact(c.unlearn.mask_path, "mask.npz", "unlearn.mask_path")
            out["mask"] = load_tree(path, shapes, "saliency mask")
        return out

    # -------------------------------------------------------------------------------------------- state
    def _init_params(self):
        """(start params, start EMA) host trees from the pretrained ``init_checkpoint``."""
        from sfd_jax.ddpm.init import load_all_networks
        c = self.config
        kind, nets = load_all_networks(c.init_checkpoint, c)
        if kind != "pretrained":
            raise UsageError(f"init_checkpoint {c.init_checkpoint} is not a pretrained DDPM (it holds "
                             f"{', '.join(nets)}); {self.mode} unlearns from a pretrained model")
        name = "ema" if c.unlearn.get("init_from_ema", False) else "model"
        if nets.get(name) is None:
            raise UsageError(f"init_checkpoint {c.init_checkpoint} holds no {name!r} weights")
        return nets[name], nets.get("ema", nets[name])

    def _restore(self, abstract, sh):
        targets = {k: with_shardings(v, s) for (k, v), s in zip(_items(abstract).items(), _items(sh).values())}
        step, items = self.restore_newest(targets)
        cls = type(abstract)
        state = (cls(jnp.int32(step), *[items[k] for k in cls.ITEMS]) if cls in (AccumState, FisherState)
                 else state_from_items("pretrain", step, items))
        logging.info("resumed from step %d", step)
        return state.replace(step=jax.device_put(jnp.int32(step), self.repl))

    def build(self):
        """(state, state_shardings, frozen params or None, txs)."""
        if self.mode == "retrain":
            return super().build()
        shapes, p_sh = self._param_shardings()
        start, ema0 = self._init_params()
        frozen = self._put(start, p_sh)
        step0 = jax.device_put(jnp.int32(0), self.repl)
        resume = self.latest_step()
        if self.mode in ARTIFACT_MODES:
            cls = FisherState if self.mode == "sa_fim" else AccumState
            n = len(cls.ITEMS)
            sh = cls(self.repl, *[p_sh] * n)
            if resume is not None:
                return self._restore(cls(jax.ShapeDtypeStruct((), jnp.int32), *[shapes] * n), sh), sh, frozen, ()
            zeros = jax.jit(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p), out_shardings=p_sh)
            return cls(step0, *[zeros(frozen) for _ in range(n)]), sh, frozen, ()
        tx = make_optimizer(self.config.optim, "global_norm")
        opt_abs = jax.eval_shape(tx.init, shapes)
        sh = PretrainState(step=self.repl, params=p_sh, ema=p_sh,
                           opt=parallel.state_shardings(opt_abs, self.mesh, self.min_size))
        if resume is not None:
            abstract = PretrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes, ema=shapes, opt=opt_abs)
            return self._restore(abstract, sh), sh, frozen, (tx,)
        params = self._put(start, p_sh)
        opt, _ = self._opt_init(tx, params, p_sh)
        return PretrainState(step=step0, params=params, ema=self._put(ema0, p_sh), opt=opt), sh, frozen, (tx,)

    # --------------------------------------------------------------------------------------------- steps
    def make_step(self, sh, txs):
        """The jitted step of this mode, with its input shardings."""
        from sfd_jax.ddpm.baselines import esd, sa, salun
        c, m, ac, bs = self.config, self.model, self.alphas_cumprod, self.batch_sharding
        B, p_sh, repl = int(c.training.batch_size), self._param_shardings()[1], self.repl
        if self.mode == "retrain":
            return super().make_step(sh, txs)
        if self.mode == "sa_fim":
            fn, ins = sa.make_fisher_step(m, c, ac, batch_sharding=bs), (sh, p_sh, repl, repl, repl, repl)
        elif self.mode == "sa":
            fn = sa.make_sa_step(m, c, ac, txs[0], batch_size=B, batch_sharding=bs)
            ins = (sh, p_sh, p_sh, repl, repl, repl)
        elif self.mode == "salun_mask":
            fn, ins = salun.make_mask_step(m, c, ac, batch_sharding=bs), (sh, p_sh, bs, bs, bs, repl)
        elif self.mode == "salun":
            fn, ins = salun.make_salun_step(m, c, ac, txs[0], batch_sharding=bs), (sh, p_sh, bs, bs, bs, bs, repl)
        else:
            fn, ins = esd.make_esd_step(m, c, ac, txs[0], batch_size=B, batch_sharding=bs), (sh, p_sh, repl)
        return jax.jit(fn, in_shardings=ins, out_shardings=(sh, repl), donate_argnums=(0,))

    # ------------------------------------------------------------------------------------------------ run
    def run(self, sigterm_at_step: int | None = None):
        """Train (or accumulate) to the end of the schedule, resuming if the workdir has checkpoints."""
        inputs = self._inputs()   # data and artifact errors before any set-up
        with self.guarded() as stop:
            self.check_resume_config()
            state, sh, frozen, txs = self.build()
            start = int(jax.device_get(state.step))
            self.write_config(start)
            if self.mode == "sa_fim":
                inputs["replay"] = self._replay(frozen)
            feed, total, close = self._feed(inputs, frozen, start)
            step_fn = self.make_step(sh, txs)
            key = self.root_key
            run_step = lambda st, i: step_fn(st, *feed(i), key)   # noqa: E731
            c = self.config
            snap = int(c.training.snapshot_freq)
            schedule = StepSchedule(total=total, log_freq=int(c.training.log_freq), snapshot_freq=snap,
                                    lrs={} if self.mode in ARTIFACT_MODES else {"lr": float(c.optim.lr)})
            if self.mode in ARTIFACT_MODES:
                grids, items = (lambda st, tag: None), _items
            else:
                sampler = self._grid_sampler(sh.params)
                grids, items = (lambda st, tag: self.save_grids(sampler, st, int(tag))), state_items
            task = LoopTask(name=self.mode, step=run_step, items=items, grids=grids,
                            meta={"mode": self.mode, "init_checkpoint": c.init_checkpoint, "recipe_seed": int(c.seed),
                                  "label_to_forget": self.forget},
                            images_per_step=self._images_per_step(), close=close)
            state = run_loop(self, task, schedule, state, start, stop, sigterm_at_step=sigterm_at_step)
            if self.mode in ARTIFACT_MODES and int(jax.device_get(state.step)) >= total:
                self._write_artifact(state, inputs)
            return state

    def _images_per_step(self) -> int:
        if self.mode == "sa_fim":   # timesteps (single-image passes) per step
            from sfd_jax.ddpm.baselines.sa import fisher_timesteps
            return int(fisher_timesteps(self.config)[0].shape[1])
        return int(self.config.training.batch_size)

    def _feed(self, inputs, frozen, start: int):
        """(feed(step) -> the step's inputs after the state, total steps, close)."""
        c, B = self.config, int(self.config.training.batch_size)
        total, close = int(c.training.n_iters), (lambda: None)
        if self.mode == "retrain":
            from sfd_jax.ddpm.baselines.retrain import retrain_stream
            stream = retrain_stream(inputs["dataset"], c, process_index=jax.process_index(),
                                    process_count=jax.process_count())
            it = prefetch(stream.iterate(start), size=2, to_device=device_put_fn(self.batch_sharding))
            return (lambda i: next(it)), total, it.close
        if self.mode == "esd":
            return (lambda i: (frozen,)), total, close
        if self.mode == "sa":
            fisher = self._put(inputs["fisher"], self._param_shardings()[1])
            imgs, labels = (jax.device_put(a, self.repl) for a in inputs["replay"])
            return (lambda i: (frozen, fisher, imgs, labels)), total, close
        if self.mode == "sa_fim":
            from sfd_jax.data import to_model_space
            from sfd_jax.ddpm.baselines.sa import fisher_timesteps
            imgs, labels = inputs["replay"]
            n = int(c.unlearn.fisher_n_samples) or len(imgs)
            n_chunks = int(fisher_timesteps(c)[0].shape[0])
            x = jax.device_put(to_model_space(np.asarray(imgs[:n])), self.repl)
            lab = jax.device_put(np.asarray(labels[:n], np.int32), self.repl)
            one = jax.device_put(np.float32(1.0), self.repl)
            return (lambda i: (frozen, x[i // n_chunks], lab[i // n_chunks], one)), n * n_chunks, close
        ds = inputs["dataset"]
        forget_idx = np.flatnonzero(ds.labels == self.forget)
        if self.mode == "salun_mask":
            from sfd_jax.data import to_model_space
            x, lab = _pad(ds.images[forget_idx], B), _pad(ds.labels[forget_idx].astype(np.int32), B)
            w = _pad(np.ones(len(forget_idx), np.float32), B)
            put = device_put_fn(self.batch_sharding)
            P, p = jax.process_count(), jax.process_index()
            local = slice(p * B // P, (p + 1) * B // P)

            def feed(i):
                sl = slice(i * B, (i + 1) * B)
                return (frozen,) + tuple(put(a[local]) for a in (to_model_space(x[sl]), lab[sl], w[sl]))
            return feed, -(-len(forget_idx) // B), close
        from sfd_jax.data import BatchStream
        Bf = int(c.unlearn.forget_batch_size) or B
        kw = dict(flip=bool(c.data.random_flip), process_index=jax.process_index(), process_count=jax.process_count())
        remain = BatchStream(ds, B, seed=int(c.seed), labels_keep=remain_classes(c), **kw)
        forget = BatchStream(ds, Bf, seed=int(c.seed) + 1, labels_keep=[self.forget], **kw)
        pairs = (r + f for r, f in zip(remain.iterate(start), forget.iterate(start)))
        it = prefetch(pairs, size=2, to_device=device_put_fn(self.batch_sharding))
        mask = self._put(inputs["mask"], self._param_shardings()[1]) if "mask" in inputs else \
            jax.tree_util.tree_map(jnp.ones_like, frozen)
        return (lambda i: (mask, *next(it))), total, it.close

    # -------------------------------------------------------------------------------------------- artifacts
    def _replay(self, frozen):
        """Selective Amnesia's replay set: ``WORKDIR/replay.npz`` (made here from θ* unless it is there)."""
        from sfd_jax.ddpm.baselines.sa import make_replay
        path = os.path.join(self.workdir, "replay.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                return z["images"], z["labels"].astype(np.int32)
        print(f"sa_fim: drawing {self.config.unlearn.n_replay_per_class} replay samples per remaining class",
              flush=True)
        params = jax.device_put(jax.device_get(frozen), self.repl) if jax.process_count() == 1 else frozen
        imgs, labels = make_replay(self.model, params, self.config, self.alphas_cumprod, mesh=self.mesh)
        if self.is_main:
            tmp = path + ".tmp.npz"
            np.savez_compressed(tmp, images=imgs, labels=labels)
            os.replace(tmp, path)
        return imgs, labels

    def _write_artifact(self, state, inputs) -> None:
        acc = _gather(state.acc)
        if not self.is_main:
            return
        u = self.config.unlearn
        if self.mode == "sa_fim":
            n = int(u.fisher_n_samples) or len(inputs["replay"][0])
            path = os.path.join(self.workdir, "fisher.npz")
            save_tree(path, jax.tree_util.tree_map(lambda a: a / n, acc), n_samples=n,
                      timestep_stride=int(u.fisher_timestep_stride))
        else:
            from sfd_jax.ddpm.baselines.salun import saliency_mask
            path = os.path.join(self.workdir, "mask.npz")
            save_tree(path, saliency_mask(acc, float(u.mask_ratio)), dtype=np.uint8, mask_ratio=float(u.mask_ratio))
        print(f"{self.mode}: wrote {path}", flush=True)


def _items(state) -> dict:
    if isinstance(state, (AccumState, FisherState)):
        return {k: getattr(state, k) for k in type(state).ITEMS}
    return state_items(state)


def _pad(a: np.ndarray, multiple: int) -> np.ndarray:
    """``a`` padded with zeros along axis 0 to a multiple of ``multiple``."""
    extra = -len(a) % multiple
    return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) if extra else a


def _gather(tree):
    """Host copies of a (possibly multi-host sharded) tree."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
