"""The class-conditional DDPM side of SFD: which labels and timesteps each pass uses
(README: "The original release and our differences" › DDPM distillation).

All draws are pure functions of a PRNG key and give global-batch arrays; the step shards them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class DDPMTask:
    n_classes: int
    label_to_forget: int          # -1: plain SiD (remain = all classes, no forget passes)
    label_to_override: int | None
    pseudo_label_type: str        # when label_to_override is None: 'rand', or with a classifier 'amax' | 'prob'
    t_min: int
    t_max: int                    # exclusive, as torch.randint
    num_timesteps: int
    forget_warmup_steps: int      # steps that draw forget timesteps from the wide warmup range

    @classmethod
    def from_config(cls, config) -> "DDPMTask":
        d = config.distill
        n = int(config.data.n_classes)
        T = int(config.diffusion.num_diffusion_timesteps)
        override = d.get("label_to_override", None)
        override = None if override is None or override == "" else int(override)
        task = cls(n_classes=n, label_to_forget=int(d.label_to_forget), label_to_override=override,
                   pseudo_label_type=str(d.pseudo_label_type), t_min=int(d.t_min), t_max=int(d.t_max),
                   num_timesteps=T,
                   forget_warmup_steps=int(float(d.forget_warmup) * int(config.training.n_iters) + 0.5))
        task.validate()
        return task

    def validate(self) -> None:
        if not -1 <= self.label_to_forget < self.n_classes:
            raise ValueError(f"distill.label_to_forget={self.label_to_forget} is outside [-1, {self.n_classes})")
        if self.forgets and self.label_to_override is not None:
            if not 0 <= self.label_to_override < self.n_classes:
                raise ValueError(f"distill.label_to_override={self.label_to_override} is outside "
                                 f"[0, {self.n_classes})")
            if self.label_to_override == self.label_to_forget:
                raise ValueError("distill.label_to_override equals distill.label_to_forget")
        if self.forgets and self.label_to_override is None and self.pseudo_label_type not in ("rand", "amax", "prob"):
            raise ValueError(f"distill.pseudo_label_type={self.pseudo_label_type!r}: expected 'rand', 'amax' or "
                             "'prob'")
        if not 0 <= self.t_min < self.t_max <= self.num_timesteps:
            raise ValueError(f"need 0 <= distill.t_min < distill.t_max <= {self.num_timesteps}, "
                             f"got {self.t_min}, {self.t_max}")

    @property
    def forgets(self) -> bool:
        return self.label_to_forget >= 0

    @property
    def uses_classifier(self) -> bool:
        """Override labels come from a classifier on the fake score's x̂ ('amax' / 'prob')."""
        return self.forgets and self.label_to_override is None and self.pseudo_label_type in ("amax", "prob")

    def classifier_labels(self, key, logits: jax.Array) -> jax.Array:
        """The forgotten class masked to −inf, then argmax ('amax') or a categorical draw ('prob')."""
        logits = logits.astype(jnp.float32).at[:, self.label_to_forget].set(-jnp.inf)
        if self.pseudo_label_type == "amax":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    @property
    def remain_classes(self) -> np.ndarray:
        return np.array([c for c in range(self.n_classes) if c != self.label_to_forget], np.int32)

    def remain_labels(self, key, n: int) -> jax.Array:
        """Uniform over the remaining classes (the original draws them from the remain data's labels)."""
        classes = jnp.asarray(self.remain_classes)
        return classes[jax.random.randint(key, (n,), 0, len(self.remain_classes))]

    def forget_labels(self, n: int) -> jax.Array:
        return jnp.full((n,), self.label_to_forget, jnp.int32)

    def override_labels(self, key, n: int) -> jax.Array:
        """label_to_override, else 'rand': uniform over the other classes (the original's randint(0, 9) with the
        forgotten class mapped to 9, generalised to n_classes)."""
        if self.label_to_override is not None:
            return jnp.full((n,), self.label_to_override, jnp.int32)
        r = jax.random.randint(key, (n,), 0, self.n_classes - 1)
        return jnp.where(r == self.label_to_forget, self.n_classes - 1, r).astype(jnp.int32)

    def timesteps(self, key, n: int) -> jax.Array:
        """t ~ U{t_min, ..., t_max − 1}."""
        return jax.random.randint(key, (n,), self.t_min, self.t_max)

    def forget_timesteps(self, key, n: int, step) -> jax.Array:
        """During forget warmup, t ~ U{int(0.02T+0.5), ..., T − 21}; afterwards as :meth:`timesteps`."""
        lo, hi = int(0.02 * self.num_timesteps + 0.5), self.num_timesteps - 20
        wide = jax.random.randint(key, (n,), lo, hi)
        return jnp.where(step < self.forget_warmup_steps, wide, self.timesteps(key, n))
