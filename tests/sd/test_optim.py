"""sfd_jax.sd.optim: torch's Adam/AdamW as optax transformations, in float32 and emulated pure fp16
(README: "The original release and our differences" › SD precision)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfd_jax.sd import optim as so


# ------------------------------------------------------------------------------------------------ helpers
def _param_tree(seed: int = 0) -> dict:
    """Four fp16-valued float32 tensors of different magnitudes (one all zero)."""
    rng = np.random.default_rng(seed)
    shapes = {"zero": (257,), "small": (37, 29), "mid": (3, 3, 4, 8), "big": (65,)}
    scales = {"zero": 0.0, "small": 1e-3, "mid": 0.5, "big": 3.0}
    return {k: (rng.standard_normal(s) * scales[k]).astype(np.float16).astype(np.float32) for k, s in shapes.items()}


def _grads(params: dict, seed: int, lo: float = -5, hi: float = -1, zeros: float = 0.05) -> dict:
    """fp16-valued gradients with magnitudes 10**U(lo, hi), random signs, a fraction of exact zeros."""
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for k, p in params.items():
        g = rng.choice([-1.0, 1.0], p.shape) * 10.0 ** rng.uniform(lo, hi, p.shape)
        g[rng.random(p.shape) < zeros] = 0.0
        out[k] = g.astype(np.float16).astype(np.float32)
    return out


def _run_ours(tx, params, grads_per_step, precision):
    state = tx.init(params)

    @jax.jit
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return so.apply_updates(params, updates, precision), state

    for grads in grads_per_step:
        params, state = step(params, grads, state)
    return jax.tree_util.tree_map(np.asarray, params), state


def _run_torch(kind, params, grads_per_step, dtype, **kw):
    import torch

    tdtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    names = sorted(params)
    tparams = [torch.nn.Parameter(torch.from_numpy(params[k].copy()).to(tdtype)) for k in names]
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = cls(tparams, foreach=False, **kw)
    for grads in grads_per_step:
        for p, k in zip(tparams, names):
            p.grad = torch.from_numpy(grads[k].copy()).to(tdtype)
        opt.step()
    return {k: p.detach().float().numpy() for k, p in zip(names, tparams)}, opt


def _same_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equal as numbers (+0 == -0; NaN == NaN)."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


# ------------------------------------------------------------------------------------------ fp16 rounding
def _tie_heavy_inputs() -> np.ndarray:
    """Every finite fp16 value, every midpoint between neighbours and the float32 numbers next to each midpoint,
    the overflow boundary, inf/NaN, and 10**6 random values from 1e-11 to 1e5 (fp16 subnormals included)."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    with np.errstate(over="ignore"):
        nxt = np.nextafter(h, np.float16(np.inf))
    keep = np.isfinite(nxt)
    mid = ((h[keep].astype(np.float64) + nxt[keep].astype(np.float64)) / 2).astype(np.float32)
    rng = np.random.default_rng(0)
    rand = rng.choice([-1.0, 1.0], 10**6) * np.exp(rng.uniform(np.log(1e-11), np.log(1e5), 10**6))
    special = [65504.0, 65519.996, 65520.0, 1e5, np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-30, 2 ** -25, 2 ** -25 * 1.0000001]
    return np.concatenate([h.astype(np.float32), mid, np.nextafter(mid, np.float32(np.inf)),
                           np.nextafter(mid, np.float32(-np.inf)), np.asarray(special, np.float32),
                           rand.astype(np.float32)])


def test_round_to_fp16_is_exact_under_jit_incl_subnormals_ties_and_overflow():
    x = _tie_heavy_inputs()
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16)
    want = want16.astype(np.float32)
    got = np.asarray(jax.jit(so.round_to_fp16)(x))
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])  # bitwise
    assert np.isnan(got[np.isnan(want)]).all()
    # the float16 array (state storage) and its way back
    h = np.asarray(jax.jit(so.fp16_array)(x))
    assert h.dtype == np.float16
    assert np.array_equal(h.view(np.uint16)[~np.isnan(want)], want16.view(np.uint16)[~np.isnan(want)])
    back = np.asarray(jax.jit(so.fp16_to_f32)(want16))
    assert np.array_equal(back.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])


def test_reduce_precision_flushes_fp16_subnormals_which_is_why_we_do_not_use_it():
    """Documents the XLA behaviour that ruled out lax.reduce_precision (CPU; fp16 subnormals are < 6.1e-5)."""
    x = jnp.asarray([1e-6, 3e-5, 1e-3], jnp.float32)
    rp = np.asarray(jax.jit(lambda v: jax.lax.reduce_precision(v, exponent_bits=5, mantissa_bits=10))(x))
    ours = np.asarray(jax.jit(so.round_to_fp16)(x))
    assert ours[0] == np.float32(np.float16(1e-6)) and ours[0] > 0
    assert rp[0] == 0.0 and rp[1] == 0.0  # flushed
    assert rp[2] == ours[2]


def test_fma_f32_matches_a_single_rounding():
    rng = np.random.default_rng(3)
    n = 300_000
    a, b, c = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 5, n)) for _ in range(3))
    a, b, c = a.astype(np.float32), b.astype(np.float32), (c * 1e-3).astype(np.float32)
    ref = (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    got = np.asarray(jax.jit(so.fma_f32)(a, b, c))
    assert np.mean(got != ref) < 1e-5  # float64 reference double-rounds in rare cases
    plain = a * b + c
    assert np.mean(plain != ref) > 1e-3  # a plain float32 multiply-add is measurably different


def test_to_fp16_values_and_apply_updates_keep_the_fp16_grid():
    params = {"w": jnp.asarray([0.1, 1e-7, 3.14159, -2e-5, 70000.0]), "n": jnp.arange(3)}
    r = so.to_fp16_values(params)
    assert r["w"].dtype == jnp.float32 and r["n"].dtype == params["n"].dtype
    np.testing.assert_array_equal(np.asarray(r["w"]), [np.float16(0.1), np.float16(1e-7), np.float16(3.14159),
                                                       np.float16(-2e-5), np.inf])
    # old/new fp16 values within a factor 4096: p + (q - p) == q exactly in float32
    rng = np.random.default_rng(5)
    p = (rng.standard_normal(200_000) * np.exp(rng.uniform(-12, 8, 200_000))).astype(np.float16).astype(np.float32)
    with np.errstate(over="ignore"):
        q = (p * np.exp(rng.uniform(-8.3, 8.3, p.size)) * rng.choice([-1, 1], p.size)).astype(np.float16)
    q = q.astype(np.float32)
    q[::7] = 0.0
    ok = np.isfinite(q)
    p, q = p[ok], q[ok]
    landed = np.asarray(jax.jit(lambda p, q: optax.apply_updates(p, q - p))(p, q))
    np.testing.assert_array_equal(landed, q)
    # a 2**14-fold collapse can be inexact in float32; apply_updates re-rounds onto the grid
    p1, q1 = np.float32(100.0), np.float32(np.float16(1.0001e-4))
    raw = np.asarray(optax.apply_updates(jnp.asarray([p1]), jnp.asarray([q1 - p1])))[0]
    assert abs(raw - q1) <= 2.0 ** -24 * 100
    fixed = np.asarray(so.apply_updates(jnp.asarray([p1]), jnp.asarray([q1 - p1]), "fp16_emulated"))[0]
    assert fixed == np.float32(np.float16(fixed))


# --------------------------------------------------------------------------------------------- the API
def test_make_sd_optimizer_validates_and_state_is_a_pytree_of_arrays():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        so.make_sd_optimizer("sgd", 1e-6)
    with pytest.raises(ValueError, match="unknown precision"):
        so.make_sd_optimizer("adam", 1e-6, precision="bf16")
    params = _param_tree()
    for precision, dtype in (("fp32", jnp.float32), ("fp16_emulated", jnp.float16)):
        tx = so.make_sd_optimizer("adamw", 1e-6, precision=precision, clip_value=1.0)
        state = tx.init(params)
        leaves = jax.tree_util.tree_leaves(state)
        assert all(isinstance(x, jax.Array) for x in leaves)
        inner = state[1]
        assert isinstance(inner, so.SDAdamState) and inner.count.dtype == jnp.int32
        assert {x.dtype for x in jax.tree_util.tree_leaves(inner.mu)} == {jnp.dtype(dtype)}
        assert {x.dtype for x in jax.tree_util.tree_leaves(inner.nu)} == {jnp.dtype(dtype)}


def test_bias_correction_beyond_the_exact_table_uses_the_float32_formula():
    """beta2 = 0.999999 needs more steps than the host table holds (2**18); later steps use expm1 in float32."""
    lr, b2 = 1e-3, 0.999999
    tx = so.make_sd_optimizer("adam", lr, beta2=b2, eps=1e-8)
    params = {"w": jnp.zeros(3)}
    g = jnp.asarray([1e-3, 0.5, 2.0])
    for t in (5, 2 ** 18, 2 ** 18 + 1, 10 ** 6):
        state = tx.init(params)._replace(count=jnp.asarray(t - 1, jnp.int32))
        updates, _ = jax.jit(tx.update)({"w": g}, state, params)
        # nu = (1 - b2) g^2 after one update from zero moments; step = lr * g / (|g| sqrt(1 - b2) / sqrt(bc2) + eps)
        gg = np.asarray(g, np.float64)
        want = -lr * gg / (np.abs(gg) * np.sqrt(1 - b2) / np.sqrt(1 - b2 ** t) + 1e-8)
        np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=2e-5, err_msg=str(t))


def test_p1_example_first_fp16_step_is_sgd_like_without_torch():
    """The SGD-like fp16 step: grads [1e-5, 1e-3, 5e-3, 1e-1] on zero fp16 params, lr 1e-6, eps 1e-6."""
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.asarray([1e-5, 1e-3, 5e-3, 1e-1])}
    out = {}
    for precision in ("fp16_emulated", "fp32"):
        tx = so.make_sd_optimizer("adam", 1e-6, eps=1e-6, precision=precision)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        out[precision] = np.asarray(so.apply_updates(params, updates, precision)["w"])
    np.testing.assert_allclose(out["fp16_emulated"], [-9.9e-6, -9.9e-4, -4.9e-3, -1.0e-6], rtol=0.02)
    g = np.asarray([1e-5, 1e-3, 5e-3, 1e-1])
    np.testing.assert_allclose(out["fp32"], -1e-6 * g / (g + 1e-6), rtol=1e-5)  # ~ -1e-6 (-0.91e-6 for 1e-5)
    # the 1e-5 .. 5e-3 entries never reached the fp16 second moment: step = lr * g / fp16(eps)
    np.testing.assert_allclose(out["fp16_emulated"][:3], -1e-6 * np.asarray([1e-5, 1e-3, 5e-3], np.float32)
                               .astype(np.float16).astype(np.float32) / np.float32(np.float16(1e-6)), rtol=2e-3)


def test_fp16_emulated_matches_a_numpy_float16_reference_elementwise():
    """Each op in float32 and rounded to fp16 (numpy), including fp16 subnormal moments and gradients."""
    lr, eps, b2 = 3e-6, 1e-6, 0.999
    rng = np.random.default_rng(7)
    n = 50_000
    p = (rng.standard_normal(n) * 0.3).astype(np.float16)
    m, v = np.zeros(n, np.float16), np.zeros(n, np.float16)
    tx = so.make_sd_optimizer("adam", lr, eps=eps, precision="fp16_emulated")
    params = {"w": p.astype(np.float32)}
    state = tx.init(params)
    step = jax.jit(lambda prm, g, st: tx.update(g, st, prm))
    f32 = np.float32
    # steps 1-4, then a jump across the end of the bias-correction table (16,628 steps for beta2 = 0.999)
    for t in (1, 2, 3, 4, 16626, 16627, 16628, 16629, 16630, 40000):
        if int(state.count) != t - 1:
            state = state._replace(count=jnp.asarray(t - 1, jnp.int32))
        g = (rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-8, 0, n)).astype(np.float16)
        updates, state = step(params, {"w": g.astype(np.float32)}, state)
        params = so.apply_updates(params, updates, "fp16_emulated")
        # numpy reference (beta1 = 0: exp_avg = g; addcmul as one fused multiply-add, via float64: exact here)
        m = g.copy()
        v = (v.astype(f32) * f32(b2)).astype(np.float16)
        v = ((f32(1 - b2) * g.astype(f32)).astype(np.float64) * g.astype(np.float64) + v.astype(np.float64))
        v = v.astype(f32).astype(np.float16)
        d = np.sqrt(v.astype(f32)).astype(np.float16)
        d = (d.astype(f32) / f32((1 - b2 ** t) ** 0.5)).astype(np.float16)
        d = (d.astype(f32) + f32(np.float16(eps))).astype(np.float16)
        p = (p.astype(f32) + (f32(-lr) * m.astype(f32)) / d.astype(f32)).astype(np.float16)
        assert np.array_equal(np.asarray(params["w"]), p.astype(f32)), t
        assert np.array_equal(np.asarray(state.nu["w"]).view(np.uint16), v.view(np.uint16)), t
    assert (v > 0).any() and (v.astype(f32) < 6.1e-5).any() and (v == 0).any()  # subnormal moments occurred


def test_inf_gradient_gives_nan_weights_without_clipping_as_in_the_original():
    """nan_to_num maps +-inf to +-1e5, which is +-inf in fp16; unclipped Adam then writes NaN."""
    params = {"w": jnp.asarray([0.5, -0.25, 0.0, 1.0])}
    raw = {"w": jnp.asarray([jnp.inf, -jnp.inf, jnp.nan, 1e-3])}
    g16 = so.nan_to_num_grads(raw, "fp16_emulated")["w"]
    np.testing.assert_array_equal(np.asarray(g16), [np.inf, -np.inf, 0.0, np.float32(np.float16(1e-3))])
    g32 = so.nan_to_num_grads(raw)["w"]
    np.testing.assert_array_equal(np.asarray(g32), np.asarray([1e5, -1e5, 0.0, 1e-3], np.float32))
    for clip, expect_nan in ((None, True), (1.0, False)):
        tx = so.make_sd_optimizer("adam", 1e-6, eps=1e-6, precision="fp16_emulated", clip_value=clip)
        updates, _ = tx.update({"w": g16}, tx.init(params), params)
        new = np.asarray(so.apply_updates(params, updates, "fp16_emulated")["w"])
        assert np.isnan(new[:2]).all() == expect_nan, (clip, new)
        assert np.isfinite(new[2:]).all()
    # fp32 (no fp16 overflow): the 1e5 gradients stay finite
    tx = so.make_sd_optimizer("adam", 1e-6, eps=1e-6)
    updates, _ = tx.update({"w": g32}, tx.init(params), params)
    assert np.isfinite(np.asarray(optax.apply_updates(params, updates)["w"])).all()


# ----------------------------------------------------------------------------------------- against torch
@pytest.mark.torch
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fp32_matches_torch(kind):
    pytest.importorskip("torch")
    params = _param_tree(1)
    grads = [_grads(params, s, -6, 0) for s in range(5)]
    kw = dict(lr=1e-3, betas=(0.0, 0.999), eps=1e-8) | ({"weight_decay": 0.01} if kind == "adamw" else {})
    ref, _ = _run_torch(kind, params, grads, "fp32", **kw)
    tx = so.make_sd_optimizer(kind, 1e-3, eps=1e-8, weight_decay=0.01)
    ours, _ = _run_ours(tx, params, grads, "fp32")
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-7, err_msg=k)
    # beta1 != 0 too
    kw["betas"] = (0.9, 0.99)
    ref, _ = _run_torch(kind, params, grads, "fp32", **kw)
    ours, _ = _run_ours(so.make_sd_optimizer(kind, 1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01),
                        params, grads, "fp32")
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-7, err_msg=k)


@pytest.mark.torch
@pytest.mark.parametrize("kind, lr, betas", [("adam", 1e-6, (0.0, 0.999)), ("adam", 3e-6, (0.0, 0.999)),
                                             ("adamw", 1e-6, (0.0, 0.999)), ("adamw", 3e-6, (0.0, 0.999)),
                                             ("adam", 1e-4, (0.0, 0.999)), ("adamw", 1e-3, (0.9, 0.99))])
def test_fp16_emulated_is_bit_identical_to_torch_fp16_adam(kind, lr, betas):
    pytest.importorskip("torch")
    params = _param_tree(2)
    # big enough to exercise torch's vectorised body and scalar tails; grads 1e-5 .. 1e-1 and exact zeros
    params["wide"] = (np.random.default_rng(9).standard_normal(20_001) * 0.05).astype(np.float16).astype(np.float32)
    grads = [_grads(params, s) for s in range(5)]
    eps, wd = 1e-6, 0.01
    kw = dict(lr=lr, betas=betas, eps=eps) | ({"weight_decay": wd} if kind == "adamw" else {})
    ref, opt = _run_torch(kind, params, grads, "fp16", **kw)
    tx = so.make_sd_optimizer(kind, lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd,
                              precision="fp16_emulated")
    ours, state = _run_ours(tx, params, grads, "fp16_emulated")
    names = sorted(params)
    for i, k in enumerate(names):
        same = _same_values(ours[k], ref[k])
        assert same.all(), (k, int((~same).sum()), ours[k][~same][:5], ref[k][~same][:5])
        # the moments too, bit for bit (as numbers)
        tstate = opt.state[opt.param_groups[0]["params"][i]]
        for ours_m, theirs in ((state.mu[k], tstate["exp_avg"]), (state.nu[k], tstate["exp_avg_sq"])):
            assert np.asarray(ours_m).dtype == np.float16
            assert _same_values(np.asarray(ours_m), theirs.numpy()).all(), k


@pytest.mark.torch
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fp16_inf_gradient_handling_matches_torch(clip):
    """Against torch: fp16 grads with inf/NaN -> nan_to_num (1e5 overflows to inf) -> [clip_grad_value_] -> Adam."""
    torch = pytest.importorskip("torch")
    params = {"w": np.asarray([0.5, -0.25, 0.0, 1.0, 2.0, -3.0], np.float16).astype(np.float32)}
    raw = np.asarray([np.inf, -np.inf, np.nan, 1e-3, 70000.0, -2.0], np.float32)
    p = torch.nn.Parameter(torch.from_numpy(params["w"]).half())
    opt = torch.optim.Adam([p], lr=1e-6, betas=(0.0, 0.999), eps=1e-6, foreach=False)
    with np.errstate(over="ignore"):
        p.grad = torch.nan_to_num(torch.from_numpy(raw).half(), nan=0.0, posinf=1e5, neginf=-1e5)
    if clip is not None:
        torch.nn.utils.clip_grad_value_([p], clip)
    opt.step()
    ref = p.detach().float().numpy()
    tx = so.make_sd_optimizer("adam", 1e-6, eps=1e-6, precision="fp16_emulated", clip_value=clip)
    grads = so.nan_to_num_grads({"w": jnp.asarray(raw)}, "fp16_emulated")
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    ours = np.asarray(so.apply_updates(params, updates, "fp16_emulated")["w"])
    assert _same_values(ours, ref).all(), (ours, ref)
    assert np.isnan(ref).any() == (clip is None)


@pytest.mark.torch
@pytest.mark.parametrize("kind, lr, betas", [("adam", 1e-6, (0.0, 0.999)), ("adamw", 3e-6, (0.9, 0.999))])
def test_fp16_emulated_matches_torch_bitwise_over_a_wide_gradient_range(kind, lr, betas):
    """200k entries, grads 1e-8 .. 1 (many underflow to fp16 subnormals or +-0): moments bit for bit; parameters
    bit for bit except that torch's -0.0 is +0.0 here (an additive update cannot make -0)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    n = 200_000
    params = {"a": (rng.standard_normal(n) * np.exp(rng.uniform(-12, 1, n))).astype(np.float16).astype(np.float32)}
    grads = [_grads(params, s, -8, 0, zeros=0.1) for s in range(6)]
    kw = dict(lr=lr, betas=betas, eps=1e-6) | ({"weight_decay": 0.01} if kind == "adamw" else {})
    ref, opt = _run_torch(kind, params, grads, "fp16", **kw)
    tx = so.make_sd_optimizer(kind, lr, beta1=betas[0], beta2=betas[1], eps=1e-6, precision="fp16_emulated")
    ours, state = _run_ours(tx, params, grads, "fp16_emulated")
    a, b = ours["a"].astype(np.float16), ref["a"].astype(np.float16)
    differ = a.view(np.uint16) != b.view(np.uint16)
    assert (a[differ] == 0).all() and np.signbit(b[differ]).all() and differ.mean() < 1e-3
    tstate = opt.state[opt.param_groups[0]["params"][0]]
    assert np.array_equal(np.asarray(state.mu["a"]).view(np.uint16), tstate["exp_avg"].numpy().view(np.uint16))
    assert np.array_equal(np.asarray(state.nu["a"]).view(np.uint16), tstate["exp_avg_sq"].numpy().view(np.uint16))
    nu = np.asarray(state.nu["a"]).astype(np.float32)
    assert ((nu > 0) & (nu < 6.1e-5)).mean() > 0.05  # fp16 subnormal second moments were exercised


@pytest.mark.parametrize("precision", ["fp16_emulated", "fp32"])
def test_small_leaves_updated_together_give_the_per_leaf_results_bitwise(precision):
    """map_leaves: none grouped (0), the small ones (100: three of four leaves, one of them all zero), all (1e9):
    5 jitted steps of nan_to_num -> Adam -> apply_updates give identical parameters and moments (fp32 ignores
    group_below: grouped, XLA's FMA contraction changed the last bit of 5 of 1,152 elements)."""
    params = _param_tree(3)
    runs = {}
    for group_below in (0, 100, 10 ** 9):
        tx = so.make_sd_optimizer("adamw", 1e-3, eps=1e-6, precision=precision, clip_value=1.0,
                                  group_below=group_below)

        @jax.jit
        def step(p, st, g):
            g = so.nan_to_num_grads(g, precision, group_below)
            u, st = tx.update(g, st, p)
            return so.apply_updates(p, u, precision, group_below), st

        p, st = jax.jit(lambda t: so.to_fp16_values(t, group_below))(params), None
        st = tx.init(p)
        for i in range(5):
            g = _grads(params, i)
            g["big"][0] = np.nan if i == 2 else g["big"][0]
            p, st = step(p, st, g)
        runs[group_below] = [np.asarray(x) for x in jax.tree_util.tree_leaves((p, st))]
    for group_below in (100, 10 ** 9):
        for a, b in zip(runs[0], runs[group_below]):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
