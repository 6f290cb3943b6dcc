"""models.group_norm against torch.nn.GroupNorm in fp32: values and gradients (input, scale, bias), both sum paths
(the CPU contraction and jnp.sum), the shapes of the DDPM and SD UNets; and the same parameters as flax's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.models.group_norm import GroupNorm, group_norm


@pytest.mark.torch
@pytest.mark.parametrize("on_cpu", [True, False])
@pytest.mark.parametrize("shape,groups,eps", [((2, 8, 8, 64), 32, 1e-6), ((3, 4, 4, 96), 32, 1e-5),
                                              ((2, 5, 7, 32), 8, 1e-6), ((2, 16, 64), 32, 1e-6)])
def test_matches_torch_group_norm_values_and_gradients(shape, groups, eps, on_cpu):
    import torch
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    scale = (rng.random(shape[-1]) + 0.5).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)     # a random cotangent

    def loss(x, s, b):
        return jnp.sum(jax.nn.swish(group_norm(x, s, b, groups, eps, on_cpu=on_cpu)) * w)
    y = group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups, eps, on_cpu=on_cpu)
    gx, gs, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

    tx = torch.tensor(np.moveaxis(x, -1, 1).copy(), requires_grad=True)   # channels first for torch
    norm = torch.nn.GroupNorm(groups, shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale))
        norm.bias.copy_(torch.from_numpy(bias))
    ty = norm(tx)
    (torch.nn.functional.silu(ty) * torch.from_numpy(np.moveaxis(w, -1, 1).copy())).sum().backward()
    np.testing.assert_allclose(np.asarray(y), np.moveaxis(ty.detach().numpy(), 1, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.moveaxis(tx.grad.numpy(), 1, -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gs), norm.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gb), norm.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_same_parameters_as_flax_group_norm_and_clear_error():
    import flax.linen as nn
    x = jnp.ones((1, 4, 4, 64))
    ours = GroupNorm(32, 1e-6).init(jax.random.PRNGKey(0), x)
    flax = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False).init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, ours) == jax.tree_util.tree_map(jnp.shape, flax)
    with pytest.raises(ValueError, match="do not split into 32 groups"):
        GroupNorm(32).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 48)))
