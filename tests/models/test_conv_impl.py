"""The dot-based convolution paths (``model.conv_impl``) equal ``lax.conv`` in fp32: values and gradients, for
every convolution shape of the CIFAR-10 UNet (its kernels, strides, paddings and channel counts; small spatial
sizes so that it runs in seconds), and the whole UNet gives the same outputs whichever path runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.models import conv
from sfd_jax.models.ddpm_unet import ConditionalUNet

IMPLS = ("dot1x1", "im2col", "shift")


def _shapes():
    """The distinct (kernel, stride, padding, cin, cout) of the CIFAR-10 UNet, spatial size capped at 4."""
    out = {}
    for s in conv.conv_shapes(ConditionalUNet(conv_impl="im2col")):   # downsampling as pad-in-conv
        key = (s["kernel"], s["stride"], str(s["padding"]), s["cin"], s["cout"])
        out.setdefault(key, dict(s, h=min(s["h"], 4), w=min(s["w"], 4)))
    return list(out.values())


SHAPES = _shapes()


def _pad(s):
    if s["padding"] == "SAME":
        return (conv._same_padding(s["kernel"]),) * 2
    return ((0, 0), (0, 0)) if s["padding"] == "VALID" else s["padding"]


def test_shapes_cover_the_unet():
    kinds = {(s["kernel"], s["stride"]) for s in SHAPES}
    assert kinds == {(3, 1), (3, 2), (1, 1)}
    assert {(s["cin"], s["cout"]) for s in SHAPES} >= {(3, 128), (128, 3), (512, 256), (384, 128)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s", SHAPES, ids=lambda s: f"{s['kernel']}x{s['kernel']}s{s['stride']}_{s['cin']}to{s['cout']}")
def test_matches_lax_values_and_grads(s, impl):
    rng = np.random.default_rng(s["cin"] * 7 + s["cout"] + s["kernel"])
    k = s["kernel"]
    x = jnp.asarray(rng.standard_normal((2, s["h"], s["w"], s["cin"]), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, s["cin"], s["cout"]), np.float32) / np.sqrt(k * k * s["cin"]))
    pad = _pad(s)
    ref_f = lambda x, w: conv.conv2d(x, w, stride=s["stride"], padding=pad, impl="lax")  # noqa: E731
    f = lambda x, w: conv.conv2d(x, w, stride=s["stride"], padding=pad, impl=impl)  # noqa: E731
    y_ref, y = ref_f(x, w), f(x, w)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5)
    cot = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    g_ref = jax.grad(lambda x, w: jnp.sum(ref_f(x, w) * cot), argnums=(0, 1))(x, w)
    g = jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_lax_impl_is_flax_conv():
    """conv_impl='lax' is nn.Conv bit for bit (same parameters, same computation)."""
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    for k, stride, padding in ((3, 1, "SAME"), (1, 1, "SAME"), (3, 2, "VALID")):
        ours = conv.Conv2D(16, k, strides=stride, padding=padding, impl="lax")
        theirs = nn.Conv(16, (k, k), strides=(stride, stride), padding=padding)
        p = theirs.init(jax.random.key(1), x)
        assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(ours.init(jax.random.key(1), x))
        np.testing.assert_array_equal(ours.apply(p, x), theirs.apply(p, x))


def test_auto_resolution():
    assert conv.resolve("auto", "gpu") == "lax" and conv.resolve("auto", "tpu") == "lax"
    assert conv.resolve("auto", "cpu") == conv.CPU_AUTO
    assert conv.resolve("im2col", "gpu") == "im2col"
    with pytest.raises(ValueError):
        conv.resolve("winograd")


@pytest.mark.parametrize("impl", IMPLS)
def test_unet_same_params_and_outputs(impl):
    m = ConditionalUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                        in_channels=1, out_ch=1, conv_impl="lax")
    p = m.init_params(jax.random.key(0))
    other = m.clone(conv_impl=impl)
    assert jax.tree_util.tree_structure(other.init_params(jax.random.key(0))) == jax.tree_util.tree_structure(p)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t, c = jnp.array([10.0, 400.0, 900.0]), jnp.array([0, 3, 9])
    np.testing.assert_allclose(other.apply({"params": p}, x, t, c), m.apply({"params": p}, x, t, c),
                               rtol=1e-5, atol=1e-5)
