"""The Stable Diffusion optimizers (the original's ``--optimizer``) as optax transformations
(README: "The original release and our differences" › SD precision).

    tx = make_sd_optimizer("adam", 1e-6, eps=1e-6, precision="fp16_emulated", clip_value=1.0)
    params = to_fp16_values(params)                     # the original's weights are fp16 from the start
    grads = nan_to_num_grads(grads, "fp16_emulated")    # the loop's nan_to_num (+-1e5 is +-inf in fp16)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates, "fp16_emulated")

``kind`` 'adam' is ``torch.optim.Adam(lr, betas=(beta1, beta2), eps)``; 'adamw' is ``torch.optim.AdamW`` with the
same and ``weight_decay`` (decoupled: ``p <- p * (1 - lr * wd)`` before the Adam step). There is no learning-rate
schedule (as in the original). ``clip_value`` puts ``optax.clip`` (torch's ``clip_grad_value_``) first.

precision
---------
``'fp32'``: float32 moments; equals torch's float32 Adam/AdamW up to float32 rounding (the tests: <= 1e-7).

``'fp16_emulated'``: the original's ``--fp16`` training, where the parameters **and both Adam moments** are
fp16 tensors and torch's Adam runs on them with no fp32 master copy. Every op of torch's Adam on half tensors is
reproduced with its rounding: the op is computed in float32 (torch's ``opmath``) and its result rounded to fp16
(round to nearest even, fp16 subnormals kept, overflow to inf):

    g   = fp16(grad)
    p   = fp16(p * f32(1 - lr*wd))                        (AdamW only: param.mul_)
    m   = fp16(fma(c1, g - m, base))                      (exp_avg.lerp_(g, 1 - b1): c1 = w, base = m if w < 0.5,
                                                           else c1 = w - 1, base = g; exact when b1 = 0)
    v   = fp16(v * f32(b2));  v = fp16(fma(f32(1 - b2) * g, g, v))     (exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2))
    d   = fp16(sqrt(v));  d = fp16(d / f32(sqrt(bc2)));  d = fp16(d + fp16(eps))   (the scalar of add_ is fp16!)
    p   = fp16(p + (f32(-lr / bc1) * m) / d)              (param.addcdiv_(m, d, value=-lr/bc1))

``fma`` is a fused multiply-add (one rounding): torch's CPU kernels compute lerp and addcmul that way (the
vectorised lerp is ``fmadd(coeff, end - start, base)``; addcmul's ``self + v*t1*t2`` is contracted by the
compiler), and nvcc contracts the same expressions on CUDA. We emulate it exactly: the two factors are split by
integer masking into 12-bit halves, so all partial products are exact float32 numbers, and they are summed with a
compensated (TwoSum) sum. This needs no float64 and is immune to XLA/LLVM fusing multiply-adds itself (fusing a
multiply whose product is exact into an add changes nothing). The bias corrections are computed like torch, in
float64 on the host (``1 - beta**step``, ``(.)**0.5``) and rounded to float32: a table indexed by the step count,
up to the step after which both scalars stay constant in float32 (16,628 steps for beta2 = 0.999).

The fp16 rounding (:func:`round_to_fp16`) is ``lax.reduce_precision(x, 5, 10)`` for the normal fp16 range and,
for |x| < 2**-14, the subnormal grid computed directly (``round_half_even(x * 2**24) * 2**-24``, exact power-of-two
scalings), because reduce_precision flushes fp16 subnormals to zero (checked on CPU). The subnormals matter:
eps = 1e-6 is itself an fp16 subnormal (1.0133e-6), and so is ``0.001 * g**2`` for small g. We do not round with
an f32->f16->f32 ``astype`` pair: XLA may drop such a pair (its simplify-fp-conversions pass) when
``xla_allow_excess_precision`` is on, its default. Converting an already fp16-representable value is exact, so the
moments are stored as float16 arrays (half the memory) by ``astype`` after rounding. (A first version did the
rounding with integer arithmetic on the bit pattern: the same values, but ~4x the HLO per parameter leaf, which
took 7 GB and 77 s to compile for the tiny test UNet; this version: 0.9 GB and 14 s.) The emulation is ~100 ops
per leaf, so leaves below the FSDP threshold go through it together, raveled and concatenated
(:func:`map_leaves`; elementwise, so bitwise the same numbers): for the tiny test UNet 17 calls instead of 208.

Parameters stay float32 arrays that hold fp16 values. The update returned is ``new_fp16_value - param``; adding it
back (``optax.apply_updates``) lands exactly on the fp16 value whenever the subtraction is exact in float32, which
holds whenever old or new value is 0 or their magnitudes are within a factor 2**12 of each other (both are fp16
numbers: 11-bit significands, so the difference needs at most 24 bits). Only a parameter whose magnitude changes by
more than 4096x in one step (nonzero before and after) can be off, by at most 2**-24 times the larger magnitude;
:func:`apply_updates` therefore re-rounds to fp16 after adding, so parameters always stay on the fp16 grid
(:func:`to_fp16_values` does the rounding).

Against torch 2.13 (CPU, half tensors, ``foreach=False``; tests/sd/test_optim.py) parameters and both moments
are identical as numbers, and the moments bit for bit, over many steps, for gradients from 1e-8 to 1, betas (0,
0.999) and others, Adam and AdamW. The one bitwise difference: a parameter that torch leaves at -0.0 is +0.0 here (an
additive update cannot produce -0: x + (-x) = +0). torch's CPU kernels are not even consistent about the sign of
zero themselves (the vectorised body of lerp fuses, its scalar tail does not). torch's default on CUDA is the
``foreach`` implementation: the same ops with the same fp16 roundings (its kernels divide by the scalar via a
reciprocal, which can differ in the last float32 bit before the fp16 rounding; not checked on a GPU here).

What differs from the original: the gradients themselves are computed by our (float32/bfloat16) networks and then
rounded to fp16, not produced by an fp16 backward pass.

The XLA facts above were checked on CPU (jax 0.10.2): ``astype(float16)`` was honoured there, reduce_precision
flushed subnormals, and XLA contracts ``a * b + c`` into an FMA (which is why the 'fp32' AdamW decay product goes
through :func:`fma_f32`, keeping torch's two roundings).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

KINDS = ("adam", "adamw")
PRECISIONS = ("fp32", "fp16_emulated")
_MAX_TABLE = 1 << 18  # steps with exact host-computed bias corrections (beyond: float32 formula)
GROUP_BELOW = 1 << 14  # leaves smaller than this go through the elementwise updates together (= FSDP's default)


def map_leaves(fn, *trees, group_below: int = GROUP_BELOW) -> list:
    """``[fn(*leaves) for each leaf position of trees[0]]`` (``fn``: elementwise, returns an array or a tuple of
    arrays of the leaves' shape). Leaves with fewer than ``group_below`` elements are raveled, concatenated (per
    combination of dtypes) and go through ``fn`` in one call: the same elementwise results with far fewer XLA ops
    (the fp16 emulation is ~100 ops per leaf; 192 of the tiny test UNet's 208 leaves are small). Keep
    ``group_below`` at or under the FSDP threshold so that no sharded array is concatenated."""
    treedef = jax.tree_util.tree_structure(trees[0])
    rows = list(zip(*[treedef.flatten_up_to(t) for t in trees]))
    out: list = [None] * len(rows)
    groups: dict = {}
    for i, row in enumerate(rows):
        if int(np.prod(np.shape(row[0]), dtype=np.int64)) < group_below:
            groups.setdefault(tuple(jnp.result_type(x) for x in row), []).append(i)
        else:
            out[i] = fn(*row)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = fn(*rows[idx[0]])
            continue
        res = fn(*[jnp.concatenate([jnp.ravel(rows[i][j]) for i in idx]) for j in range(len(trees))])
        single = not isinstance(res, tuple)
        sizes = [int(np.prod(np.shape(rows[i][0]), dtype=np.int64)) for i in idx]
        parts = [jnp.split(r, np.cumsum(sizes)[:-1]) for r in ((res,) if single else res)]
        for k, i in enumerate(idx):
            vals = tuple(part[k].reshape(np.shape(rows[i][0])) for part in parts)
            out[i] = vals[0] if single else vals
    return out


def _unflatten_like(tree, leaves):
    return jax.tree_util.tree_structure(tree).unflatten(leaves)


# --------------------------------------------------------------------------------------------- fp16 rounding
def round_to_fp16(x: jax.Array) -> jax.Array:
    """The float16 value nearest to ``x`` (as float32), exact under jit on any backend (see module docstring):
    ``lax.reduce_precision`` for the normal fp16 range (it flushes fp16 subnormals), and for |x| < 2**-14 the
    subnormal grid directly, ``round_half_even(x·2**24)·2**-24`` (power-of-two scalings are exact in float32)."""
    x = jnp.asarray(x, jnp.float32)
    sub = jnp.round(x * jnp.float32(2.0 ** 24)) * jnp.float32(2.0 ** -24)
    return jnp.where(jnp.abs(x) < jnp.float32(2.0 ** -14), sub, lax.reduce_precision(x, exponent_bits=5,
                                                                                        mantissa_bits=10))


def fp16_array(x: jax.Array) -> jax.Array:
    """``x`` rounded to float16, as a float16 array (the convert of an fp16-representable value is exact, so no
    backend can change it)."""
    return round_to_fp16(x).astype(jnp.float16)


def fp16_to_f32(h: jax.Array) -> jax.Array:
    """A float16 array -> float32, exactly (subnormals kept)."""
    return jnp.asarray(h).astype(jnp.float32)


def to_fp16_values(params, group_below: int = GROUP_BELOW):
    """Round every floating leaf to the nearest fp16 value, keeping its dtype (float32 arrays holding fp16 values).

    The original's ``--fp16`` weights are fp16 from the start: apply this to the parameters at init.
    ``group_below``: see :func:`map_leaves`."""
    def one(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return round_to_fp16(x.astype(jnp.float32)).astype(x.dtype)
    return _unflatten_like(params, map_leaves(one, params, group_below=group_below))


def apply_updates(params, updates, precision: str = "fp32", group_below: int = GROUP_BELOW):
    """``optax.apply_updates``; with 'fp16_emulated' the sums are re-rounded to fp16 (a no-op except for a
    parameter whose magnitude changed by more than 4096x in one step, see the module docstring)."""
    _check_precision(precision)
    new = optax.apply_updates(params, updates)
    return to_fp16_values(new, group_below) if precision == "fp16_emulated" else new


def nan_to_num_grads(grads, precision: str = "fp32", group_below: int = GROUP_BELOW):
    """The loop's ``nan_to_num(nan=0, posinf=1e5, neginf=-1e5)`` on every gradient leaf.

    With 'fp16_emulated' the gradients are fp16 tensors in the original, where 1e5 overflows: +-inf stays +-inf
    and the result is rounded to fp16 (finite float32 gradients beyond 65504 become inf, as an fp16
    backward would have made them). An inf gradient reaches Adam unless clipped: the fake score (no clipping) then
    gets NaN weights, G (clip_grad_value_ 1) does not."""
    _check_precision(precision)

    def one(g):
        g = jnp.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5)
        return round_to_fp16(g.astype(jnp.float32)).astype(g.dtype) if precision == "fp16_emulated" else g
    fp16 = precision == "fp16_emulated"   # fp32: nothing to round, leaf by leaf as torch_adam's fp32 path
    return _unflatten_like(grads, map_leaves(one, grads, group_below=group_below if fp16 else 0))


# -------------------------------------------------------------------------------------------- float32 fma
def _split12(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x = hi + lo exactly, each with at most 12 significant bits (hi: x with its 12 low mantissa bits cleared)."""
    u = lax.bitcast_convert_type(x, jnp.uint32)
    hi = lax.bitcast_convert_type(u & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, x - hi


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fma_f32(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """float32 ``a * b + c`` with one rounding (as a hardware FMA), for finite values of moderate magnitude
    (no partial product may underflow; true for everything Adam meets here). Non-finite results come from the
    plain expression."""
    a_hi, a_lo = _split12(a)
    b_hi, b_lo = _split12(b)
    p1, p2, p3, p4 = a_hi * b_hi, a_hi * b_lo, a_lo * b_hi, a_lo * b_lo  # all exact
    s1, e1 = _two_sum(c, p1)
    t, et = _two_sum(p2, p3)
    s2, e2 = _two_sum(s1, t)
    out = s2 + ((e1 + e2) + (et + p4))  # the small terms: rounding error ~2**-48 max(|c|, |ab|)
    plain = a * b + c
    # an exactly zero result means a*b was exact, so the plain expression has IEEE's sign of zero (our sums of
    # zeros may not); non-finite results come from the plain expression as well
    return jnp.where(jnp.isfinite(plain) & (out != 0), out, plain)


# ------------------------------------------------------------------------------------------------ Adam
class SDAdamState(NamedTuple):
    """count: int32 steps taken; mu/nu: first/second moments, float16 ('fp16_emulated') or float32."""
    count: jax.Array
    mu: Any
    nu: Any


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def _scalar_tables(lr: float, beta1: float, beta2: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``sqrt(1 - beta2**t)`` and ``-lr / (1 - beta1**t)`` for t = 1..n, computed in float64 as torch's
    ``_single_tensor_adam`` does (Python floats), up to where both are constant in float32 (or _MAX_TABLE)."""
    bc2_sqrt, neg_step = [], []
    t = 0
    while t < _MAX_TABLE:
        t += 1
        step = float(t)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        bc2_sqrt.append(np.float32(bias_correction2 ** 0.5))
        neg_step.append(np.float32(-(lr / bias_correction1)))
        if bc2_sqrt[-1] == np.float32(1.0) and neg_step[-1] == np.float32(-lr) and t > 1:
            break
    return np.asarray(bc2_sqrt, np.float32), np.asarray(neg_step, np.float32)


def torch_adam(lr: float, *, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, precision: str = "fp32",
               group_below: int = GROUP_BELOW) -> optax.GradientTransformation:
    """torch's single-tensor Adam (``weight_decay`` 0) or AdamW (decoupled ``weight_decay``), including the
    learning rate: ``update(grads, state, params)`` returns ``new_param - param``. See the module docstring for
    ``precision``; ``group_below``: small leaves updated together (:func:`map_leaves`; 'fp16_emulated' only)."""
    _check_precision(precision)
    if not lr >= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or not eps >= 0 or not weight_decay >= 0:
        raise ValueError(f"invalid Adam hyperparameters: lr={lr}, betas=({beta1}, {beta2}), eps={eps}, "
                         f"weight_decay={weight_decay}")
    fp16 = precision == "fp16_emulated"
    moment_dtype = jnp.float16 if fp16 else jnp.float32
    bc2_table, step_table = _scalar_tables(lr, beta1, beta2)
    w = np.float32(1 - beta1)  # lerp weight, as torch's opmath float
    small = abs(float(w)) < 0.5
    coeff = w if small else np.float32(w - np.float32(1))
    decay = np.float32(1 - lr * weight_decay)
    b2 = np.float32(beta2)
    one_minus_b2 = np.float32(1 - beta2)
    # torch's add_(eps) on a half tensor rounds the scalar to half first (1e-6 -> 1.0133e-6, an fp16 subnormal)
    eps_op = np.float32(np.float16(eps)) if fp16 else np.float32(eps)

    rnd = round_to_fp16 if fp16 else (lambda x: x)
    fma = fma_f32 if fp16 else (lambda a, b, c: a * b + c)
    load = fp16_to_f32 if fp16 else (lambda x: x)
    store = fp16_array if fp16 else (lambda x: x)

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)  # noqa: E731
        return SDAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree_util.tree_map(zeros, params),
                           nu=jax.tree_util.tree_map(zeros, params))

    def scalars(count):
        n = len(bc2_table)
        idx = jnp.minimum(count, n) - 1
        bc2_sqrt, neg_step = jnp.asarray(bc2_table)[idx], jnp.asarray(step_table)[idx]
        if n == _MAX_TABLE:  # beyond the table: float32 formula (only for beta2 extremely close to 1)
            t = count.astype(jnp.float32)
            far = count > n
            bc2_sqrt = jnp.where(far, jnp.sqrt(-jnp.expm1(t * np.float32(math.log(beta2)))), bc2_sqrt)
            bc1 = -jnp.expm1(t * np.float32(math.log(beta1))) if beta1 > 0 else jnp.float32(1)
            neg_step = jnp.where(far, np.float32(-lr) / bc1, neg_step)
        return bc2_sqrt, neg_step

    def one(g, m, v, p, bc2_sqrt, neg_step):
        p0 = jnp.asarray(p)
        p = rnd(p0.astype(jnp.float32))
        g = rnd(jnp.asarray(g).astype(jnp.float32))
        m, v = load(m), load(v)
        if weight_decay != 0:  # AdamW's param.mul_ (fp32: a correctly rounded product XLA cannot fuse into an FMA)
            p = rnd(p * decay) if fp16 else fma_f32(p, decay, jnp.zeros_like(p))
        base = m if small else g
        # with beta1 = 0 (every SD recipe) coeff is 0: 0·(g − m) is exact, so the FMA is a plain sum
        m = rnd(base + coeff * (g - m)) if coeff == 0 else rnd(fma(coeff, g - m, base))
        v = rnd(v * b2)
        v = rnd(fma(one_minus_b2 * g, g, v))
        d = rnd(jnp.sqrt(v))
        d = rnd(d / bc2_sqrt)
        d = rnd(d + eps_op)
        new = rnd(p + (neg_step * m) / d)
        return (new - p0.astype(jnp.float32)).astype(p0.dtype), store(m), store(v)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("torch_adam needs params (tx.update(grads, state, params))")
        count = state.count + 1
        bc2_sqrt, neg_step = scalars(count)
        # fp32: leaf by leaf (whether XLA contracts a·b + c into an FMA depends on the fusion; grouped leaves
        # changed the last bit of a few elements in tests/sd/test_optim.py); fp16 emulation: bitwise the same
        leaves = map_leaves(lambda g, m, v, p: one(g, m, v, p, bc2_sqrt, neg_step), grads, state.mu, state.nu,
                            params, group_below=group_below if fp16 else 0)
        treedef = jax.tree_util.tree_structure(grads)
        updates = treedef.unflatten([x[0] for x in leaves])
        mu = treedef.unflatten([x[1] for x in leaves])
        nu = treedef.unflatten([x[2] for x in leaves])
        return updates, SDAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_sd_optimizer(kind: str, lr: float, *, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8,
                      weight_decay: float = 0.01, precision: str = "fp32",
                      clip_value: float | None = None, group_below: int = GROUP_BELOW) -> optax.GradientTransformation:
    """The SD optimizers of the original's ``--optimizer``: 'adam' (weight decay 0, ``weight_decay`` ignored) or
    'adamw' (decoupled ``weight_decay``), with torch's numerics; ``clip_value`` -> ``optax.clip`` first. The original
    uses betas (0, 0.999) and eps 1e-8, or 1e-6 with --fp16 (pass it). ``precision``: 'fp32' | 'fp16_emulated'.
    ``update`` needs ``params``; see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {', '.join(KINDS)}")
    _check_precision(precision)
    adam = torch_adam(lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay if kind == "adamw" else 0.0,
                      precision=precision, group_below=group_below)
    if clip_value is None:
        return adam
    return optax.chain(optax.clip(clip_value), adam)
