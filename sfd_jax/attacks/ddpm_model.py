"""What the DDPM attacks (:mod:`~sfd_jax.attacks.latent`, :mod:`~sfd_jax.attacks.relearn`) share: the attacked
network with a differentiable sampler, the two classifiers (attacker and judge, split checked first), and the
recognition rate of the target class.

Sampling: a distilled checkpoint is its one-step generator x0 = G(z) (t_init of its config); a pretrained one
(a teacher or a baseline) runs deterministic DDIM (η 0) with guidance s ((1+s)·cond − s·uncond), ``ddim_steps``
and ``cond_scale`` defaulting to its config's ``sampling.grid_steps`` / ``sampling.grid_cond_scale`` (the
leaderboard's sampler: 20 steps, s = 2 on digits). Images are NHWC in data space [-1, 1].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.cli_utils import UsageError


def load_classifiers(spec) -> tuple[Any, Any]:
    """(attacker, judge) :class:`~sfd_jax.eval.classifier_train.LoadedClassifier`; UsageError (one line) when the
    judge is the attacker (:func:`sfd_jax.attacks.spec.check_judge`). Call before any sampling."""
    from sfd_jax.attacks.spec import check_judge
    from sfd_jax.eval.classifier_train import load_classifier
    from sfd_jax import parallel
    attacker = load_classifier(spec.attacker_classifier)
    judge = load_classifier(spec.judge_classifier)
    check_judge(attacker, judge)
    repl = parallel.replicated(parallel.make_mesh())
    for clf in (attacker, judge):
        clf.variables = jax.device_put(clf.variables, repl)     # placed once: scored every few steps
    return attacker, judge


def target_class(spec, n_classes: int) -> int:
    """``spec.target`` as a class index in [0, n_classes) (UsageError otherwise)."""
    t = str(spec.target).strip()
    if not t.lstrip("-").isdigit() or not 0 <= int(t) < n_classes:
        raise UsageError(f"--target must be a class index in [0, {n_classes}) for a DDPM checkpoint, got {t!r}")
    return int(t)


def resolve_weights(weights: str) -> str:
    """'auto' -> 'ema' (the sampling default of ``sample`` and ``evaluate forgetting``); else 'ema' | 'raw'."""
    if weights not in ("auto", "ema", "raw"):
        raise UsageError(f"--weights must be auto, ema or raw, got {weights!r}")
    return "ema" if weights == "auto" else weights


@dataclasses.dataclass
class AttackedModel:
    """One network of a DDPM checkpoint with a pure, differentiable sampler.

    ``sample_fn(params, noise [B,H,W,C], labels [B]) -> x0 [B,H,W,C]`` (data space, unclamped), jit-able and
    differentiable in ``params`` and ``noise``; ``remat`` wraps every DDIM step's network call in
    ``jax.checkpoint`` (activations of one step kept at a time, for the gradient through the sampler)."""
    network: Any                    # sfd_jax.ddpm.networks.LoadedNetwork
    model: Any                      # ConditionalUNet
    alphas_cumprod: np.ndarray      # float32 [T]
    sampler: str                    # 'one_step' | 'ddim'
    t_init: int
    ddim_steps: int
    cond_scale: float
    image_shape: tuple[int, int, int]
    n_classes: int

    @property
    def config(self):
        return self.network.config

    @property
    def params(self):
        return self.network.params

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        if self.sampler == "one_step":
            return 1
        return self.ddim_steps * (2 if self.cond_scale != 0.0 else 1)

    def describe(self) -> dict:
        d = {"network": self.network.name, "kind": self.network.kind, "step": self.network.step,
             "sampler": self.sampler, "nfe": self.nfe}
        if self.sampler == "one_step":
            d["t_init"] = self.t_init
        else:
            d.update(ddim_steps=self.ddim_steps, eta=0.0, cond_scale=self.cond_scale)
        return d

    def sample_fn(self, remat: bool = False) -> Callable:
        from sfd_jax.ddpm import diffusion
        ac = jnp.asarray(self.alphas_cumprod, jnp.float32)
        model, sampler, t_init, cond_scale = self.model, self.sampler, self.t_init, float(self.cond_scale)
        seq = None if sampler == "one_step" else diffusion.timestep_sequence("uniform", self.ddim_steps, len(ac))

        def sample(params, noise, labels):
            if sampler == "one_step":
                eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, 0.0)
                return diffusion.generator_sample(eps_fn, noise, t_init, ac)
            eps_fn = diffusion.class_conditional_eps_fn(model.apply, params, labels, cond_scale)
            if remat:
                eps_fn = jax.checkpoint(eps_fn)
            return diffusion.ddim_sample(eps_fn, noise, seq, ac, eta=0.0, rng=jax.random.key(0))
        return sample


def load_attacked_model(spec, weights: str | None = None) -> AttackedModel:
    """The network of ``spec.checkpoint`` the attack runs on (replicated over the default mesh)."""
    from sfd_jax import parallel
    from sfd_jax.ddpm import diffusion
    from sfd_jax.ddpm.networks import load_network, t_init_of
    from sfd_jax.models.ddpm_unet import ConditionalUNet

    w = resolve_weights(spec.weights if weights is None else weights)
    net = load_network(spec.checkpoint, weights=w, sharding=parallel.replicated(parallel.make_mesh()))
    cfg = net.config
    _, ac = diffusion.schedule_from_config(cfg)
    sp = cfg.get("sampling", {})
    steps = getattr(spec, "ddim_steps", None) or int(sp.get("grid_steps", 20) or 20)
    scale = getattr(spec, "cond_scale", None)
    scale = float(sp.get("grid_cond_scale", 0.0) or 0.0) if scale is None else float(scale)
    n_t = int(cfg.diffusion.num_diffusion_timesteps)
    if not 1 <= steps <= n_t:
        raise UsageError(f"--ddim_steps must be in [1, {n_t}], got {steps}")
    size = int(cfg.data.image_size)
    return AttackedModel(network=net, model=ConditionalUNet.from_config(cfg), alphas_cumprod=np.asarray(ac),
                         sampler="one_step" if net.kind == "distilled" else "ddim", t_init=t_init_of(cfg),
                         ddim_steps=int(steps), cond_scale=scale, image_shape=(size, size, int(cfg.model.in_channels)),
                         n_classes=int(cfg.data.n_classes))


def check_classifiers_fit(attacked: AttackedModel, *classifiers) -> None:
    """UsageError unless every classifier takes the model's images and has its classes."""
    for clf in classifiers:
        c = clf.config
        if (c.image_size, c.image_size, c.channels) != attacked.image_shape or c.n_classes != attacked.n_classes:
            raise UsageError(f"classifier {clf.source} takes {c.image_size}x{c.image_size}x{c.channels} images of "
                             f"{c.n_classes} classes; the model makes {'x'.join(map(str, attacked.image_shape))} "
                             f"images of {attacked.n_classes}")


def initial_noise(seed: int, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """float32 [n, *shape] standard normal, sample i from ``fold_in(key, i)`` with ``key`` = the first half of
    ``split(key(seed))`` (the same noise as :func:`sfd_jax.ddpm.generate.generate` draws for ``seed``)."""
    noise_key, _ = jax.random.split(jax.random.key(seed))
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape, jnp.float32)))
    return np.asarray(draw(jnp.arange(n, dtype=jnp.int32)))


def recognised(clf, images: np.ndarray, target: int) -> float:
    """The share of ``images`` (float data space, NHWC) the classifier recognises as ``target``, after the uint8
    quantisation every sample goes through (:func:`sfd_jax.image_io.to_uint8`)."""
    if len(images) == 0:
        return float("nan")
    return float(np.mean(predictions(clf, images) == target))


def recognised_as(clf, images: np.ndarray) -> list[int]:
    """How many of ``images`` the classifier puts in each class (a histogram of length n_classes)."""
    return np.bincount(predictions(clf, images), minlength=clf.config.n_classes).tolist()


def predictions(clf, images: np.ndarray) -> np.ndarray:
    """The classifier's class (argmax) for every image (float data space, NHWC, uint8-quantised first)."""
    from sfd_jax.eval.classifier_train import to_model_input
    from sfd_jax.image_io import to_uint8
    fn, mesh = _predict_fn(clf.config)
    mult = parallel_divisor(mesh)
    x = to_model_input(to_uint8(images))
    pad = -len(x) % mult
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)]) if pad else x
    logits = np.asarray(fn(clf.variables, x))[: len(images)]
    return np.argmax(logits, -1)


@functools.lru_cache(maxsize=8)
def _predict_fn(config):
    """One jitted classifier per config (the attacks score every few steps; variables are an argument)."""
    from sfd_jax.eval.classifier_train import make_predict_fn
    return make_predict_fn(config)


def parallel_divisor(mesh) -> int:
    from sfd_jax import parallel
    return parallel.batch_divisor(mesh)


def classifier_log_prob(clf) -> Callable:
    """``f(variables, x [B,H,W,C] data space, target) -> [B]`` the classifier's log-probability of ``target`` on
    clip(x, −1, 1) (differentiable; eval-mode BatchNorm); pass ``clf.variables``."""
    model = clf.model

    def log_prob(variables, x, target):
        logits = model.apply(variables, jnp.clip(x, -1.0, 1.0), train=False).astype(jnp.float32)
        return jax.nn.log_softmax(logits, -1)[:, target]
    return log_prob
