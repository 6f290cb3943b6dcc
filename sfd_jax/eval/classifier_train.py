"""Train, save, load and apply the evaluation classifiers of :mod:`sfd_jax.models.classifier`.

Training is deterministic for a given seed, device count and batch size: the initial weights come from
``key(seed)``, the epoch order from ``numpy.random.default_rng(seed)``, the augmentation of step ``s`` from
``fold_in(key(seed + 1), s)``. Batches are split over the mesh's batch axes (BatchNorm statistics are over
the global batch). Optimiser: AdamW with a cosine learning-rate decay (``TrainConfig``).

The original fine-tunes an ImageNet ResNet-34 at 224 px for 10 epochs with Adam (lr 1e-5 body / 1e-4 fc,
coupled L2 5e-4; README: "The original release and our differences" › DDPM evaluation). No ImageNet weights
are reachable here, so ours trains from scratch at the native resolution; a torchvision ResNet-34 ``.pth`` of the
original classifier can be loaded instead (:func:`load_classifier`).

Checkpoint layout (our Orbax :class:`~sfd_jax.checkpoint.Checkpointer`):
``OUT/checkpoints/<step>/{classifier, config, meta}``: item ``classifier`` = ``{'params', 'batch_stats'}``,
``config`` = :class:`ClassifierConfig` as JSON (arch, n_classes, image_size, channels, ...), ``meta`` = training
facts (dataset, held-out accuracy, epochs, ...). ``OUT/classifier.json`` repeats config and meta for people.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from sfd_jax import parallel
from sfd_jax.models.classifier import (ClassifierConfig, build_classifier, import_torchvision_resnet,
                                       init_variables, torchvision_resnet_arch)

CLASSIFIER_ITEM = "classifier"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4       # decoupled (AdamW)
    warmup_steps: int = 0
    seed: int = 0
    hflip: bool = False              # random horizontal flips (natural images; not for digits)
    crop_pad: int = 0                # random translations: pad by this many pixels (edge mode), crop back
    label_smoothing: float = 0.0


@dataclasses.dataclass
class LoadedClassifier:
    config: ClassifierConfig
    variables: Any
    meta: dict
    source: str

    @property
    def model(self):
        return build_classifier(self.config)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (0..255) -> float32 in [-1, 1] (the original's ToTensor + Normalize(0.5, 0.5))."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def _augment(x: jax.Array, rng: jax.Array, tcfg: TrainConfig) -> jax.Array:
    b, h, w, _ = x.shape
    k_flip, k_crop = jax.random.split(rng)
    if tcfg.hflip:
        flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
    if tcfg.crop_pad:
        p = tcfg.crop_pad
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        offs = jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(xp, offs)
    return x


def _batch_size_for(n: int, batch_size: int, mesh) -> int:
    mult = parallel.batch_divisor(mesh)
    bs = min(batch_size, n)
    bs = max(mult, bs // mult * mult)
    return bs


def make_predict_fn(config: ClassifierConfig, mesh=None):
    """jit(variables, x [B,H,W,C] in [-1,1]) -> logits [B, n_classes] float32, batch split over ``mesh``.
    One jitted function per (config, mesh), so repeated evaluations (per epoch, per attack step) compile once."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    return _predict_fn(config, mesh), mesh


@functools.lru_cache(maxsize=32)
def _predict_fn(config: ClassifierConfig, mesh):
    model = build_classifier(config)

    def predict(variables, x):
        return model.apply(variables, x, train=False).astype(jnp.float32)

    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(predict, in_shardings=(repl, batch), out_shardings=batch)


def predict_logits(config: ClassifierConfig, variables, images: np.ndarray, *, batch_size: int = 256,
                   mesh=None, progress: bool = False, desc: str = "classifying") -> np.ndarray:
    """Logits [N, n_classes] for uint8 images [N, H, W, C]; fixed-size batches (the last one padded)."""
    fn, mesh = make_predict_fn(config, mesh)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    n = len(images)
    mult = parallel.batch_divisor(mesh)
    bs = max(mult, -(-min(batch_size, max(n, 1)) // mult) * mult)
    out = np.zeros((n, config.n_classes), np.float32)
    starts = range(0, n, bs)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2, leave=False):
        chunk = to_model_input(images[start:start + bs])
        k = len(chunk)
        if k < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:], np.float32)])
        out[start:start + k] = np.asarray(fn(variables, chunk))[:k]
    return out


def accuracy(config: ClassifierConfig, variables, images: np.ndarray, labels: np.ndarray, **kw) -> float:
    if len(images) == 0:
        return float("nan")
    logits = predict_logits(config, variables, images, **kw)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def train_classifier(config: ClassifierConfig, train_images: np.ndarray, train_labels: np.ndarray,
                     test_images: np.ndarray | None = None, test_labels: np.ndarray | None = None, *,
                     tcfg: TrainConfig = TrainConfig(), mesh=None, progress: bool = True,
                     stop=None) -> tuple[dict, dict]:
    """Train from scratch on uint8 images [N, H, W, C] with int labels [N]. ``stop``: an optional
    :class:`threading.Event`; once set, the next step raises ``concurrent.futures.CancelledError``.

    Returns (variables, history) where history has per-epoch ``train_loss``, ``train_acc`` and ``test_acc``
    (the held-out accuracy, when test data is given) and ``steps``.
    """
    train_images = np.asarray(train_images)
    train_labels = np.asarray(train_labels).astype(np.int32)
    expected = (config.image_size, config.image_size, config.channels)
    if train_images.shape[1:] != expected:
        raise ValueError(f"training images are {train_images.shape[1:]}, the classifier config expects {expected}")
    if train_labels.min() < 0 or train_labels.max() >= config.n_classes:
        raise ValueError(f"labels must be in [0, {config.n_classes}), got {train_labels.min()}..{train_labels.max()}")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    n = len(train_images)
    bs = _batch_size_for(n, tcfg.batch_size, mesh)
    steps_per_epoch = n // bs
    total = max(1, steps_per_epoch * tcfg.epochs)

    model = build_classifier(config)
    schedule = optax.warmup_cosine_decay_schedule(0.0 if tcfg.warmup_steps else tcfg.lr, tcfg.lr,
                                                  tcfg.warmup_steps, total, end_value=tcfg.lr * 0.01)
    tx = optax.adamw(schedule, weight_decay=tcfg.weight_decay)
    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def init():
        variables = init_variables(config, jax.random.key(tcfg.seed))
        return {"variables": variables, "opt": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}

    state = jax.jit(init, out_shardings=repl)()
    aug_key = jax.random.key(tcfg.seed + 1)

    def train_step(state, images, labels):
        x = images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
        x = _augment(x, jax.random.fold_in(aug_key, state["step"]), tcfg)
        others = {k: v for k, v in state["variables"].items() if k != "params"}

        def loss_fn(params):
            logits, updates = model.apply({"params": params, **others}, x, train=True, mutable=list(others))
            onehot = optax.smooth_labels(jax.nn.one_hot(labels, config.n_classes), tcfg.label_smoothing) \
                if tcfg.label_smoothing else jax.nn.one_hot(labels, config.n_classes)
            loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["variables"]["params"])
        upd, opt = tx.update(grads, state["opt"], state["variables"]["params"])
        params = optax.apply_updates(state["variables"]["params"], upd)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        new = {"variables": {"params": params, **updates}, "opt": opt, "step": state["step"] + 1}
        return new, {"loss": loss, "acc": acc}

    step_fn = jax.jit(train_step, in_shardings=(repl, batch, batch), out_shardings=(repl, repl),
                      donate_argnums=0)
    rng = np.random.default_rng(tcfg.seed)
    history: dict[str, list] = {"train_loss": [], "train_acc": [], "test_acc": []}
    bar = tqdm(total=total, desc=f"train {config.arch}", unit="step", disable=not progress)
    for epoch in range(tcfg.epochs):
        perm = rng.permutation(n)
        losses, accs = [], []
        for i in range(steps_per_epoch):
            if stop is not None and stop.is_set():
                bar.close()
                raise concurrent.futures.CancelledError("classifier training stopped")
            idx = np.sort(perm[i * bs:(i + 1) * bs])
            state, m = step_fn(state, train_images[idx], train_labels[idx])
            losses.append(m["loss"])
            accs.append(m["acc"])
            bar.update(1)
        history["train_loss"].append(float(np.mean(jax.device_get(losses))))
        history["train_acc"].append(float(np.mean(jax.device_get(accs))))
        if test_images is not None and len(test_images):
            history["test_acc"].append(accuracy(config, state["variables"], test_images, test_labels, mesh=mesh))
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}",
                        **({"held_out": f"{history['test_acc'][-1]:.3f}"} if history["test_acc"] else {}))
    bar.close()
    history["steps"] = total
    history["batch_size"] = bs
    return jax.device_get(state["variables"]), history


# ------------------------------------------------------------------------------------------------------------
# Save / load.
def save_classifier(out_dir: str | os.PathLike, variables, config: ClassifierConfig, meta: Mapping[str, Any],
                    step: int = 0) -> str:
    """Write ``OUT/checkpoints/<step>/`` (items classifier, config, meta) and ``OUT/classifier.json``."""
    import ml_collections
    from sfd_jax.checkpoint import Checkpointer

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"))
    ckpt.save(step, {CLASSIFIER_ITEM: jax.device_get(variables)},
              config=ml_collections.ConfigDict(config.to_dict()), meta=dict(meta))
    ckpt.wait()
    ckpt.close()
    with open(os.path.join(out_dir, "classifier.json"), "w") as f:
        json.dump({"config": config.to_dict(), "meta": dict(meta)}, f, indent=2, sort_keys=True)
    return out_dir


def load_classifier(path: str | os.PathLike, *, image_size: int | None = None, input_size: int | None = 224,
                    normalization: str = "none") -> LoadedClassifier:
    """Load our classifier checkpoint (``OUT``, ``OUT/checkpoints`` or a step dir) or a torchvision ``.pth``.

    A ``.pth`` (a torchvision ResNet-18/34 ``state_dict``, e.g. the original's ``cifar10_resnet34.pth``) is read
    without executing code; it carries no image size, so ``image_size`` (the samples' size) is required, and the
    model resizes to ``input_size`` (224 for the original's classifier) with ``normalization``.
    """
    from sfd_jax.checkpoint import Checkpointer, resolve_checkpoint_dir
    from sfd_jax.cli_utils import UsageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"classifier {path!r} does not exist")
    if os.path.isfile(path):
        from sfd_jax.convert.torch_pickle import load_torch_file
        sd = load_torch_file(path)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping) or "fc.weight" not in sd:
            raise UsageError(f"{path} is not a torchvision ResNet state dict (no 'fc.weight')")
        if image_size is None:
            raise UsageError(f"{path} carries no image size; pass the samples' size")
        try:
            arch = torchvision_resnet_arch(sd)
            cfg = ClassifierConfig(arch=arch, n_classes=int(np.asarray(sd["fc.weight"]).shape[0]),
                                   image_size=int(image_size), channels=3, stem="imagenet", input_size=input_size,
                                   normalization=normalization)
            variables = import_torchvision_resnet(sd, cfg)
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
        return LoadedClassifier(cfg, variables, {"source": "torchvision state dict"}, path)

    directory, step = resolve_checkpoint_dir(path)
    ckpt = Checkpointer(directory)
    items = ckpt.items(step)
    if CLASSIFIER_ITEM not in items:
        raise UsageError(f"{path} is not a classifier checkpoint (it holds {', '.join(items)}); "
                         "train one with `python -m sfd_jax.evaluate train-classifier`")
    cfg = ClassifierConfig.from_dict(ckpt.restore_json("config", step))
    meta = ckpt.restore_json("meta", step)
    from sfd_jax.models.classifier import abstract_variables
    target = abstract_variables(cfg)
    variables = ckpt.restore({CLASSIFIER_ITEM: target}, step)[CLASSIFIER_ITEM]
    ckpt.close()
    return LoadedClassifier(cfg, variables, dict(meta), path)


def train_on_dataset(dataset: str, out: str, *, data_path: str | None = None, split: str = "train",
                     test_split: str = "test", val_fraction: float = 0.1, image_size: int | None = None,
                     channels: int | None = None, arch: str = "cnn", stem: str = "cifar", width: int = 32,
                     epochs: int = 30, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                     seed: int = 1234, hflip: bool | None = None, crop_pad: int | None = None,
                     progress: bool = True) -> tuple[ClassifierConfig, dict, str]:
    """Train an evaluation classifier on a dataset (:func:`sfd_jax.data.load_dataset`) and save it to ``out``.

    Held out: ``test_split`` when the dataset has it, else ``val_fraction`` of ``split`` (a permutation from
    ``seed``). ``hflip`` default: on for RGB; ``crop_pad`` default: 1 for <=16 px, 4 otherwise. Returns (the
    classifier's config, meta, the directory written)."""
    from sfd_jax.cli_utils import UsageError
    from sfd_jax.data import DatasetError, load_dataset

    try:
        train = load_dataset(dataset, data_path, split=split, image_size=image_size, channels=channels)
        test = None
        if test_split:
            try:
                test = load_dataset(dataset, data_path, split=test_split, image_size=image_size, channels=channels)
            except DatasetError as e:
                if "split" not in str(e):
                    raise
    except DatasetError as e:
        raise UsageError(str(e)) from None
    tr_x, tr_y = train.images, train.labels
    if test is not None:
        te_x, te_y, held_out = test.images, test.labels, f"split {test_split!r}"
    else:
        if not 0 < val_fraction < 1:
            raise UsageError(f"--val_fraction must be in (0, 1), got {val_fraction}")
        perm = np.random.default_rng(seed).permutation(len(tr_x))
        n_val = max(1, int(round(val_fraction * len(tr_x))))
        te_x, te_y = tr_x[perm[:n_val]], tr_y[perm[:n_val]]
        tr_x, tr_y = tr_x[perm[n_val:]], tr_y[perm[n_val:]]
        held_out = f"{n_val} images of split {split!r} (permutation seed {seed})"
    h, w, c = tr_x.shape[1:]
    if h != w:
        raise UsageError(f"{dataset} images are {h}x{w}; pass --image_size to make them square")
    cfg = ClassifierConfig(arch=arch, n_classes=train.n_classes, image_size=h, channels=c, width=width, stem=stem)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                       hflip=(c == 3) if hflip is None else hflip,
                       crop_pad=(1 if h <= 16 else 4) if crop_pad is None else crop_pad)
    variables, hist = train_classifier(cfg, tr_x, tr_y, te_x, te_y, tcfg=tcfg, progress=progress)
    meta = {"dataset": train.name, "data_path": data_path, "split": split, "held_out": held_out,
            "n_train": int(len(tr_x)), "n_held_out": int(len(te_x)),
            "held_out_accuracy": hist["test_acc"][-1], "train_accuracy": hist["train_acc"][-1],
            "train_loss": hist["train_loss"][-1], "steps": hist["steps"], "batch_size": hist["batch_size"],
            "train_config": {k: v for k, v in tcfg.__dict__.items()}}
    return cfg, meta, save_classifier(out, variables, cfg, meta, step=hist["steps"])
