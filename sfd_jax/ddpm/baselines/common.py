"""What the baseline steps share: the Adam+EMA update of a :class:`PretrainState`, the accumulator state of the
artifact modes, and the ``.npz`` files that hold a parameter-shaped artifact (a Fisher diagonal, a mask)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sfd_jax.cli_utils import UsageError
from sfd_jax.distill.state import PretrainState, ema_update


@struct.dataclass
class AccumState:
    """A running sum over the steps of an artifact mode: ``acc`` has the parameters' tree (float32)."""
    step: jax.Array            # int32 scalar: completed steps
    acc: object

    ITEMS = ("acc",)


@struct.dataclass
class FisherState:
    """The Fisher pass: ``acc`` = Σ weight·g² over finished samples, ``partial`` = the current sample's gradient
    over its finished chunks (both in the parameters' tree, float32)."""
    step: jax.Array
    acc: object
    partial: object

    ITEMS = ("acc", "partial")


def apply_gradients(state: PretrainState, grads, tx: optax.GradientTransformation, ema_rate: float) -> PretrainState:
    """One optimizer step (clipping is part of ``tx``) and the EMA, after the backward pass."""
    updates, opt = tx.update(grads, state.opt, state.params)
    params = optax.apply_updates(state.params, updates)
    return PretrainState(step=state.step + 1, params=params, ema=ema_update(state.ema, params, ema_rate), opt=opt)


def constrainer(batch_sharding):
    """``x -> with_sharding_constraint(x, batch_sharding)`` (identity without a sharding)."""
    return (lambda x: x) if batch_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding))


def tree_sum_sq_diff(weights, a, b) -> jax.Array:
    """Σ over every parameter element of weights·(a − b)², float32 (the EWC penalty)."""
    leaves = jax.tree_util.tree_map(lambda w, x, y: jnp.sum(w * jnp.square(x - y)), weights, a, b)
    return sum(jax.tree_util.tree_leaves(leaves), jnp.float32(0.0))


# ------------------------------------------------------------------------------------------- artifacts
def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_tree(path: str, tree, dtype=np.float32, **meta) -> None:
    """Write a parameter-shaped tree as ``path`` (npz: one array per parameter, named by its tree path, plus
    ``__meta__<key>`` scalars), atomically."""
    arrays = {k: v.astype(dtype) for k, v in _flat(tree).items()}
    arrays.update({f"__meta__{k}": np.asarray(v) for k, v in meta.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def resolve_artifact(path: str, filename: str, key: str) -> str:
    """``path`` itself, or ``path/filename`` when ``path`` is the workdir of the mode that wrote it."""
    if not path:
        raise UsageError(f"{key} is empty: give the file (or the workdir) that holds {filename}")
    cand = os.path.join(path, filename) if os.path.isdir(path) else path
    if not os.path.isfile(cand):
        raise UsageError(f"{key}={path!r}: no {filename} there" if os.path.isdir(path) else
                         f"{key}={path!r} does not exist")
    return cand


def load_tree(path: str, like, what: str):
    """The tree of ``path`` (written by :func:`save_tree`) in the structure of ``like`` (a params tree or its
    ShapeDtypeStructs), float32 host arrays. A file of another tree is one-line error naming the first
    parameter that is missing, extra or of another shape."""
    try:
        with np.load(path) as z:
            stored = {k: z[k] for k in z.files if not k.startswith("__meta__")}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer for the user
        raise UsageError(f"{what} {path} is not a readable .npz ({type(e).__name__})") from None
    want = jax.tree_util.tree_flatten_with_path(like)[0]
    names = [jax.tree_util.keystr(kp) for kp, _ in want]
    for (kp, leaf), name in zip(want, names):
        if name not in stored:
            raise UsageError(f"{what} {path} does not fit the model: it has no parameter {name} "
                             f"(it holds {len(stored)} arrays, the model {len(names)})")
        if tuple(stored[name].shape) != tuple(leaf.shape):
            raise UsageError(f"{what} {path} does not fit the model: {name} is {list(stored[name].shape)}, "
                             f"the model's is {list(leaf.shape)}")
    extra = sorted(set(stored) - set(names))
    if extra:
        raise UsageError(f"{what} {path} does not fit the model: it has a parameter {extra[0]} the model lacks")
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, [stored[n].astype(np.float32) for n in names])


def forget_label(config) -> int:
    """``unlearn.label_to_forget``: the baselines forget one class per run, so a tuple of several classes is a
    one-line UsageError (forgetting several classes at once is SFD's ``distill.label_to_forget``)."""
    v = config.unlearn.label_to_forget
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise UsageError(f"unlearn.label_to_forget={tuple(v)}: the baselines (retrain, SA, SalUn, ESD) forget one "
                             "class per run; several classes at once is SFD (distill.label_to_forget)")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise UsageError(f"unlearn.label_to_forget={v!r}: expected a class (int)")
    return int(v)


def remain_classes(config) -> list[int]:
    """Every class but ``unlearn.label_to_forget``."""
    k = forget_label(config)
    return [c for c in range(int(config.data.n_classes)) if c != k]
