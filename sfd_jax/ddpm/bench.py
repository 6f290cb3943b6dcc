"""The DDPM train steps on random weights, timed: the trainer's own step (mesh, shardings, donation) and, for
``--compare=torch``, the same iteration in PyTorch (:mod:`sfd_jax.ddpm.torch_bench`) interleaved in this process.
Library half of ``python -m sfd_jax.bench`` (which parses the flags and prints)."""
from __future__ import annotations

import os
import time

from sfd_jax.cli_utils import UsageError
from sfd_jax.perf import compiled_flops, measure


def setup_step(config, mode: str, batch: int):
    """The training step exactly as the trainer builds it (mesh, shardings, donation), on random weights:
    (jitted step, state, extra step args, root key, the model, alphas_cumprod, mesh)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sfd_jax import parallel
    from sfd_jax.ddpm import diffusion
    from sfd_jax.models.ddpm_unet import ConditionalUNet
    from sfd_jax.distill.state import PretrainState, SFDState, make_optimizer

    config.mode = mode
    config.training.batch_size = batch
    mesh = parallel.mesh_from_config(config)
    if batch % parallel.batch_divisor(mesh):
        raise UsageError(f"--batch={batch} is not divisible by the {parallel.batch_divisor(mesh)} batch shards")
    bsh, repl, min_size = parallel.batch_sharding(mesh), parallel.replicated(mesh), parallel.fsdp_min_size(config)
    model = ConditionalUNet.from_config(config)
    _, ac = diffusion.schedule_from_config(config)
    root_key = jax.random.key(int(config.seed))
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
    p_sh = parallel.state_shardings(shapes, mesh, min_size)
    params = jax.jit(model.init_params, out_shardings=p_sh)(jax.random.key(0))
    copy = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=p_sh)

    def opt_init(tx, p):
        opt_sh = parallel.state_shardings(jax.eval_shape(tx.init, p), mesh, min_size)
        return jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=opt_sh)(p), opt_sh

    step0 = jax.device_put(jnp.int32(0), repl)
    if mode == "sfd":
        from sfd_jax.ddpm.task import DDPMTask
        from sfd_jax.ddpm.steps import make_sfd_step
        task = DDPMTask.from_config(config)
        if task.uses_classifier:
            raise UsageError("the bench runs on random weights: pick a config without a classifier "
                             "(distill.pseudo_label_type 'rand' or a label_to_override)")
        g_tx, sg_tx = make_optimizer(config.g_optim, "value"), make_optimizer(config.sg_optim, "value")
        g_opt, g_sh = opt_init(g_tx, params)
        sg_opt, sg_sh = opt_init(sg_tx, params)
        state = SFDState(step=step0, generator=copy(params), generator_ema=copy(params), fake_score=copy(params),
                         g_opt=g_opt, sg_opt=sg_opt)
        sh = SFDState(step=repl, generator=p_sh, generator_ema=p_sh, fake_score=p_sh, g_opt=g_sh, sg_opt=sg_sh)
        fn = make_sfd_step(model, config, task, ac, g_tx, sg_tx, batch_size=batch, batch_sharding=bsh,
                           fused=bool(config.distill.get("fused", True)))
        step_fn = jax.jit(fn, in_shardings=(sh, p_sh, repl), out_shardings=(sh, repl), donate_argnums=(0,))
        args = (params,)
    else:
        from sfd_jax.ddpm.steps import make_pretrain_step
        tx = make_optimizer(config.optim, "global_norm")
        opt, opt_sh = opt_init(tx, params)
        state = PretrainState(step=step0, params=copy(params), ema=copy(params), opt=opt)
        sh = PretrainState(step=repl, params=p_sh, ema=p_sh, opt=opt_sh)
        res, ch = config.data.image_size, config.model.in_channels
        images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, res, res, ch)).astype(np.float32),
                                bsh)
        labels = jax.device_put(np.arange(batch, dtype=np.int32) % config.data.n_classes, bsh)
        fn = make_pretrain_step(model, config, ac, tx, batch_sharding=bsh)
        step_fn = jax.jit(fn, in_shardings=(sh, bsh, bsh, repl), out_shardings=(sh, repl), donate_argnums=(0,))
        args = (images, labels)
    return step_fn, state, args, root_key, model, ac, mesh


def jax_threads(config) -> dict:
    """What XLA:CPU runs on: its intra-op pool has one thread per schedulable core (tsl MaxParallelism)."""
    import jax
    from sfd_jax.models.conv import resolve
    return {"cpus_schedulable": len(os.sched_getaffinity(0)), "backend": jax.default_backend(),
            "conv_impl": resolve(config.model.get("conv_impl", "auto")), "xla_flags": os.environ.get("XLA_FLAGS", ""), "version": jax.__version__}


def bench(config, mode: str, batch: int, steps: int, peak_tflops: float | None = None) -> dict:
    step_fn, state, args, root_key, _, _, mesh = setup_step(config, mode, batch)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, *args, root_key).compile()
    compile_s = time.perf_counter() - t0
    r = measure(compiled, state, lambda i: (*args, root_key), steps, batch=batch, dtype=config.dtype,
                flops=compiled_flops(compiled), peak_tflops=peak_tflops)
    return {"mode": mode, "batch": batch, "dtype": config.dtype, "mesh": dict(mesh.shape),
            "compile_s": compile_s, **r, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def compare_torch(config, mode: str, batch: int, steps: int) -> dict:
    """The JAX step and the same iteration in PyTorch (:mod:`sfd_jax.ddpm.torch_bench`), same architecture and batch,
    timed in this process: one untimed warm-up step each (after JAX's compile), then ``steps`` timed steps
    alternating JAX, PyTorch, JAX, ... (each blocking until its results are ready); medians."""
    try:
        import torch  # noqa: F401  (only whether it is installed)
    except ImportError:
        raise UsageError("--compare=torch needs PyTorch (pip install torch)") from None
    import jax
    import numpy as np

    from sfd_jax.ddpm import torch_bench as bench_torch

    if config.dtype != "float32":
        raise UsageError("--compare=torch compares float32 steps (--config.dtype=float32)")
    step_fn, state, args, root_key, _, ac, mesh = setup_step(config, mode, batch)
    if jax.device_count() != 1:
        raise UsageError("--compare=torch times one device (the PyTorch side runs on the host CPU)")
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, *args, root_key).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    it = (bench_torch.TorchSFDIteration if mode == "sfd" else bench_torch.TorchPretrainIteration)(config, ac, batch)
    state, m = compiled(state, *args, root_key)
    jax.block_until_ready((state, m))
    it.step()
    tj, tt = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, *args, root_key)
        jax.block_until_ready((state, m))
        tj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        it.step()
        tt.append(time.perf_counter() - t0)
    sj, st = float(np.median(tj)), float(np.median(tt))
    return {"mode": mode, "batch": batch, "dtype": config.dtype, "steps": steps, "compile_s": compile_s,
            "flops_per_image": flops / batch if flops else None,
            "jax": {"step_ms": 1e3 * sj, "step_ms_all": [1e3 * v for v in tj], "images_per_s": batch / sj,
                    "threads": jax_threads(config), "losses": {k: float(v) for k, v in m.items()}},
            "torch": {"step_ms": 1e3 * st, "step_ms_all": [1e3 * v for v in tt], "images_per_s": batch / st,
                      "threads": bench_torch.threads(), "fused": bool(config.distill.get("fused", True))
                      if mode == "sfd" else None},
            "ratio_jax_over_torch": st / sj, "mesh": dict(mesh.shape)}
