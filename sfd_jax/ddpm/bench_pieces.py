r"""Where a DDPM UNet step spends its time: forward + backward of its pieces in JAX and in PyTorch, side by side.

  python -m sfd_jax.bench --config=configs/cifar10_train.py --pieces

For each feature-map shape of the UNet (H x W x C, NHWC for us, NCHW for PyTorch) it times the gradient of
sum(piece(x)^2) with respect to the input and the parameters, for a 3x3 convolution, GroupNorm + swish, a
ResnetBlock and (at the attention resolution) an AttnBlock, fp32, JAX and PyTorch interleaved in one process:
one warm-up call each, then the median of ``repeats`` calls. Returns rows of milliseconds.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def shapes_of(config) -> list[tuple[int, int, bool]]:
    """(resolution, channels, has attention) of each level of the UNet in ``config.model``."""
    m = config.model
    res = int(config.data.image_size) if "data" in config and "image_size" in config.data else 32
    out = []
    for i, mult in enumerate(m.ch_mult):
        out.append((res, int(m.ch) * int(mult), res in tuple(m.attn_resolutions)))
        if i < len(m.ch_mult) - 1:
            res //= 2
    return out


def time_pieces(shapes, batch: int = 8, repeats: int = 5, emb_dim: int = 1024) -> list[dict]:
    """[{'shape', 'piece', 'jax_ms', 'torch_ms'}] for ``shapes`` = [(resolution, channels, attention)]."""
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp
    import torch

    from sfd_jax.ddpm import torch_unet as T
    from sfd_jax.models import ddpm_unet as J
    from sfd_jax.models.conv import Conv2D
    from sfd_jax.models.group_norm import GroupNorm

    class Norm(fnn.Module):      # the UNet's GroupNorm (32 groups, eps 1e-6), then swish
        @fnn.compact
        def __call__(self, x):
            return fnn.swish(GroupNorm(32, 1e-6)(x))

    class Res(fnn.Module):
        c: int

        @fnn.compact
        def __call__(self, x, emb):
            return J.ResnetBlock(self.c, self.c, emb_dim, 0.0)(x, emb, False)

    class TNorm(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm = T.normalize(c)

        def forward(self, x):
            return torch.nn.functional.silu(self.norm(x))

    def jax_ms(module, x, *extra):
        params = module.init(jax.random.PRNGKey(0), x, *extra)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x, *extra) ** 2), argnums=(0, 1)))
        return _median_ms(lambda: jax.block_until_ready(grad(params, x)), repeats)

    def torch_ms(module, x, *extra):
        x = x.clone().requires_grad_(True)

        def step():
            module.zero_grad()
            x.grad = None
            (module(x, *extra) ** 2).sum().backward()
        return _median_ms(step, repeats)

    rng = np.random.default_rng(0)
    rows = []
    for res, c, attn in shapes:
        xn = rng.standard_normal((batch, res, res, c)).astype(np.float32)
        xj, xt = jnp.asarray(xn), torch.from_numpy(np.ascontiguousarray(xn.transpose(0, 3, 1, 2)))
        emb = rng.standard_normal((batch, emb_dim)).astype(np.float32)
        half = emb_dim // 2
        pieces = [("3x3 conv", (Conv2D(c, 3), xj), (torch.nn.Conv2d(c, c, 3, padding=1), xt)),
                  ("GroupNorm + swish", (Norm(), xj), (TNorm(c), xt)),
                  ("ResnetBlock", (Res(c), xj, jnp.asarray(emb)),
                   (T.ResnetBlock(c, c, 0.0, half, emb_dim - half).eval(), xt, torch.from_numpy(emb[:, :half]),
                    torch.from_numpy(emb[:, half:])))]
        if attn:
            pieces.append(("AttnBlock", (J.AttnBlock(c), xj), (T.AttnBlock(c), xt)))
        for name, j_args, t_args in pieces:
            rows.append({"shape": f"{res}x{res}x{c}", "piece": name, "jax_ms": jax_ms(*j_args),
                         "torch_ms": torch_ms(*t_args)})
    return rows
