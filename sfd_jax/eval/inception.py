"""The FID Inception-v3 in Flax (pytorch-fid's ``fid_inception_v3``), its weight converter, and feature extraction.

The network is torchvision's Inception3 with pytorch-fid's patches for the TF 2015-12-05 graph: the Mixed_5b-d
and Mixed_6b-e pool branches average without counting padding (``FIDInceptionA``/``FIDInceptionC``), Mixed_7b
likewise (``FIDInceptionE_1``), and Mixed_7c max-pools its pool branch (``FIDInceptionE_2``). Convolutions have no
bias and are followed by BatchNorm (eps 1e-3) and ReLU. Layout is NHWC; module names are the torch state-dict
names (``Mixed_5b.branch5x5_1.conv.weight`` -> ``params['Mixed_5b']['branch5x5_1']['conv']['kernel']``).

Outputs (:meth:`FIDInceptionV3.__call__`): ``pool3`` [B, 2048] (the final average pool, FID's features),
``logits`` [B, 1008] (pool3 · fc.weight; ``logits_bias=True`` adds fc.bias) and ``spatial`` [B, 17·17·7]: the
first 7 channels of Mixed_6d's 1x1 branch after its ReLU, flattened in (H, W, C) order — the counterpart of the
TF graph's ``mixed_6/conv`` that the original's evaluator (guided-diffusion) uses for sFID.

Input pipeline (:func:`preprocess`): uint8 images -> x/255 -> 299x299 bilinear resize -> 2x-1, exactly as
pytorch-fid (``F.interpolate(..., mode='bilinear', align_corners=False)``, no antialiasing). ``resize='tf1'``
instead copies the TF graph the original's evaluator runs: legacy ResizeBilinear on 0..255 values (no half-pixel
centres), then (x-128)/128 (README: "The original release and our differences" › DDPM evaluation).
Grayscale images are repeated to RGB.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` from the pytorch-fid release
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
:func:`load_fid_inception_weights` reads it without running code (zip or legacy torch.save format) and maps every
tensor, refusing files with missing, extra or misshapen tensors.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
RESIZES = ("pytorch_fid", "tf1")
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Module):
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv",
                    precision=jax.lax.Precision.HIGHEST)(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg3(x: Array) -> Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], -1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], -1), b1


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], -1)


class InceptionE(nn.Module):
    max_pool: bool   # False: FIDInceptionE_1 (avg pool without padding); True: FIDInceptionE_2

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class _Logits(nn.Module):
    """torch ``fc`` (2048 -> 1008); the original's evaluator uses the TF graph's MatMul weight without the bias."""
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 1008))
        bias = self.param("bias", nn.initializers.zeros, (1008,))
        y = jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST)
        return y + bias if self.use_bias else y


class FIDInceptionV3(nn.Module):
    """x: [B, 299, 299, 3] preprocessed (in [-1, 1]) -> {'pool3', 'logits', 'spatial'}."""
    logits_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max3s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max3s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x, _ = InceptionC(128, name="Mixed_6b")(x)
        x, _ = InceptionC(160, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
        x, _ = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(False, name="Mixed_7b")(x)
        x = InceptionE(True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits = _Logits(self.logits_bias, name="fc")(pool3)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool3": pool3, "logits": logits, "spatial": spatial}


# ------------------------------------------------------------------------------------------------------------
# Input pipeline.
def _interp_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """[n_out, n_in] bilinear weights: pytorch align_corners=False, or TF1 legacy (src = dst * in/out).

    Source positions and weights are computed in float32, as both libraries' CPU kernels do.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    dst = np.arange(n_out, dtype=f32)
    if mode == "pytorch_fid":
        src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0.0))
    else:
        src = dst * scale
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0.astype(f32)).astype(f32)
    m = np.zeros((n_out, n_in), f32)
    np.add.at(m, (np.arange(n_out), i0), f32(1.0) - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def preprocess(images: Array, resize: str = "pytorch_fid", size: int = 299) -> Array:
    """uint8 (or 0..255 float) [B, H, W, C] -> float32 [B, size, size, 3] in the network's input range."""
    if resize not in RESIZES:
        raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZES)}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if resize == "pytorch_fid":
        x = x / 255.0
    h, w = x.shape[1:3]
    if (h, w) != (size, size):
        ah = jnp.asarray(_interp_matrix(h, size, resize))
        aw = jnp.asarray(_interp_matrix(w, size, resize))
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", ah, x, precision=hp)
        x = jnp.einsum("pw,bowc->bopc", aw, x, precision=hp)
    return 2.0 * x - 1.0 if resize == "pytorch_fid" else (x - 128.0) / 128.0


# ------------------------------------------------------------------------------------------------------------
# Weights.
def _load_legacy_torch_file(path: str) -> Any:
    """Read a legacy (pre-1.6, non-zip) ``torch.save`` file without running code from it
    (:func:`sfd_jax.convert.torch_pickle.load_legacy_torch`)."""
    from sfd_jax.convert import torch_pickle as tp

    with open(path, "rb") as f:
        blob = f.read()
    return tp.load_legacy_torch(blob, os.path.basename(path))


def read_torch_state_dict(path: str) -> Mapping[str, np.ndarray]:
    """A torch state dict as numpy arrays, from a zip or legacy ``.pth``, without running code from it."""
    from sfd_jax.convert import torch_pickle as tp

    obj = _load_legacy_torch_file(path) if tp.is_legacy_torch_file(path) else tp.load_torch_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise tp.CheckpointFormatError(f"{os.path.basename(path)} does not hold a state dict")
    return obj


def abstract_variables(logits_bias: bool = False) -> dict:
    model = FIDInceptionV3(logits_bias)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3), jnp.float32)))


def _torch_key_to_path(key: str) -> tuple[str, tuple[str, ...]] | None:
    parts = key.split(".")
    leaf, mods = parts[-1], tuple(parts[:-1])
    if leaf == "num_batches_tracked":
        return None
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", mods + ("mean" if leaf == "running_mean" else "var",)
    if leaf == "weight":
        return "params", mods + ("scale" if mods[-1] == "bn" else "kernel",)
    if leaf == "bias":
        return "params", mods + ("bias",)
    return "params", mods + (leaf,)


def convert_fid_inception(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """Map a pytorch-fid Inception state dict onto :class:`FIDInceptionV3` variables.

    Returns (variables, ignored keys: only ``num_batches_tracked`` counters). Raises ValueError naming the first
    tensor that has no place, does not fit, or is missing — every tensor on both sides must be accounted for.
    """
    target = abstract_variables()
    out: dict = {"params": {}, "batch_stats": {}}
    seen, ignored = set(), []
    for key, value in state_dict.items():
        path = _torch_key_to_path(key)
        if path is None:
            ignored.append(key)
            continue
        coll, names = path
        node = target.get(coll, {})
        for n in names:
            if not isinstance(node, Mapping) or n not in node:
                raise ValueError(f"tensor {key!r} has no place in the FID Inception network")
            node = node[n]
        value = np.asarray(value, np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)      # OIHW -> HWIO
        elif value.ndim == 2:
            value = value.T
        if tuple(value.shape) != tuple(node.shape):
            raise ValueError(f"tensor {key!r} has shape {value.shape} after transposing, expected {node.shape}")
        d = out[coll]
        for n in names[:-1]:
            d = d.setdefault(n, {})
        d[names[-1]] = value
        seen.add((coll, names))
    for coll, tree in target.items():
        for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(p.key for p in kp)
            if (coll, names) not in seen:
                raise ValueError(f"the state dict has no tensor for {coll}/{'/'.join(names)}")
    return out, ignored


def load_fid_inception_weights(path: str) -> dict:
    """Variables for :class:`FIDInceptionV3` from ``pt_inception-2015-12-05-*.pth``. Raises FileNotFoundError
    (saying where to get the file) when it is missing, and ValueError/CheckpointFormatError for a wrong file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path!r} not found: download {FID_WEIGHTS_NAME} from "
                                f"{FID_WEIGHTS_URL} and pass its path")
    sd = read_torch_state_dict(path)
    try:
        variables, _ = convert_fid_inception(sd)
    except ValueError as e:
        raise ValueError(f"{os.path.basename(path)} is not the FID Inception: {e}") from None
    return variables


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Feature extraction.
class InceptionExtractor:
    """Batched, sharded feature extraction: ``features(uint8 [N, H, W, C]) -> {'pool3', 'spatial'[, 'logits']}``.

    Every batch has the same size (the last one is padded), split over the mesh's batch axes; parameters are
    replicated. ``fingerprint`` identifies weights + input pipeline (used to key cached reference statistics).
    """

    def __init__(self, variables, *, resize: str = "pytorch_fid", batch_size: int = 100, mesh=None,
                 fingerprint: str = "", logits_bias: bool = False):
        from sfd_jax import parallel

        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZES)}")
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.resize = resize
        self.fingerprint = f"{fingerprint}:{resize}:bias={logits_bias}"
        self._mult = parallel.batch_divisor(self.mesh)
        self.batch_size = max(self._mult, -(-batch_size // self._mult) * self._mult)
        model = FIDInceptionV3(logits_bias)
        repl, batch = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        self.variables = jax.device_put(variables, repl)

        def run(v, images):
            return model.apply(v, preprocess(images, resize))

        self._run = jax.jit(run, in_shardings=(repl, batch), out_shardings=batch)

    @classmethod
    def from_pth(cls, path: str, **kw) -> "InceptionExtractor":
        variables = load_fid_inception_weights(path)
        return cls(variables, fingerprint=file_sha256(path)[:16], **kw)

    def features(self, images: np.ndarray, *, progress: bool = False, logits: bool = True,
                 desc: str = "Inception") -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected images [N, H, W, 1|3], got {images.shape}")
        n = len(images)
        bs = min(self.batch_size, max(self._mult, -(-n // self._mult) * self._mult))   # small sets: no big pad
        keys = ("pool3", "spatial") + (("logits",) if logits else ())
        out: dict[str, list] = {k: [] for k in keys}
        for start in tqdm(range(0, n, bs), desc=desc, unit="batch", disable=not progress or n <= bs, leave=False):
            chunk = images[start:start + bs]
            k = len(chunk)
            if k < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:], chunk.dtype)])
            res = jax.device_get(self._run(self.variables, chunk))
            for key in keys:
                out[key].append(np.asarray(res[key][:k], np.float32))
        return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}
