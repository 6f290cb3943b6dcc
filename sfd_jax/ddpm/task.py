"""The class-conditional DDPM side of SFD: which labels and timesteps each pass uses
(README: "The original release and our differences" › DDPM distillation).

All draws are pure functions of a PRNG key and give global-batch arrays; the step shards them.

Several classes can be forgotten in one run (``distill.label_to_forget=(2, 5, 7)``): each forget sample's class is
drawn uniformly from the forgotten set, its override is that class's entry of ``distill.label_to_override`` (one
int for all, or a tuple with one per forgotten class) or a pseudo label (``'rand'``: uniform over the kept
classes; ``'amax'``/``'prob'``: the classifier with every forgotten class masked), and the remain labels are
uniform over the classes that are not forgotten. With one forgotten class every draw is the one of a
single-target run (the same keys, the same formulas).
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _show(value) -> str:
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)


def _as_classes(value, key: str) -> tuple[int, ...]:
    """A config value (an int or a sequence of ints) as a tuple of ints; ValueError naming ``key`` otherwise."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{key}={value!r}: expected a class (int) or a tuple of classes, like 3 or (2,5,7)")
    return tuple(int(v) for v in items)


def forget_classes_of(value) -> tuple[int, ...]:
    """``distill.label_to_forget`` as the tuple of forgotten classes: ``-1`` -> () (plain SiD), ``3`` -> (3,),
    ``(2, 5, 7)`` -> (2, 5, 7). ValueError (one line) for anything else."""
    classes = _as_classes(value, "distill.label_to_forget")
    if classes == (-1,) or classes == ():
        return ()
    return classes


@dataclasses.dataclass(frozen=True)
class DDPMTask:
    n_classes: int
    label_to_forget: tuple[int, ...]          # the forgotten classes, in config order; () = plain SiD (an int k
                                              # is read as (k,), -1 as ())
    label_to_override: tuple[int, ...] | None  # one per forgotten class (an int: the same for all); None = pseudo
    pseudo_label_type: str        # when label_to_override is None: 'rand', or with a classifier 'amax' | 'prob'
    t_min: int
    t_max: int                    # exclusive, as torch.randint
    num_timesteps: int
    forget_warmup_steps: int      # steps that draw forget timesteps from the wide warmup range

    def __post_init__(self):
        forget = self.label_to_forget
        if not isinstance(forget, tuple):
            object.__setattr__(self, "label_to_forget", () if forget is None or int(forget) < 0 else (int(forget),))
        override = self.label_to_override
        if override is not None and not isinstance(override, tuple):
            object.__setattr__(self, "label_to_override", (int(override),) * max(len(self.label_to_forget), 1))

    @classmethod
    def from_config(cls, config) -> "DDPMTask":
        """The task of ``config.distill``; ValueError (one line naming the key) for targets that cannot run."""
        d = config.distill
        n = int(config.data.n_classes)
        T = int(config.diffusion.num_diffusion_timesteps)
        raw_forget = d.label_to_forget
        forget = forget_classes_of(raw_forget)
        if len(forget) > 1 or isinstance(raw_forget, (list, tuple)):
            bad = [k for k in forget if not 0 <= k < n]
            if bad:
                raise ValueError(f"distill.label_to_forget={_show(raw_forget)} holds {bad[0]}, outside [0, {n})")
        elif forget and not 0 <= forget[0] < n:
            raise ValueError(f"distill.label_to_forget={forget[0]} is outside [-1, {n})")
        dup = [k for i, k in enumerate(forget) if k in forget[:i]]
        if dup:
            raise ValueError(f"distill.label_to_forget={_show(raw_forget)} lists class {dup[0]} twice")
        raw_override = d.get("label_to_override", None)
        override = None
        if raw_override is not None and raw_override != "":
            override = _as_classes(raw_override, "distill.label_to_override")
            if forget and len(override) == 1:
                override = override * len(forget)
            elif forget and len(override) != len(forget):
                raise ValueError(f"distill.label_to_override={_show(raw_override)} has {len(override)} entries but "
                                 f"distill.label_to_forget={_show(raw_forget)} has {len(forget)}: give one override "
                                 "for all, or one per forgotten class")
        task = cls(n_classes=n, label_to_forget=forget, label_to_override=override,
                   pseudo_label_type=str(d.pseudo_label_type), t_min=int(d.t_min), t_max=int(d.t_max),
                   num_timesteps=T,
                   forget_warmup_steps=int(float(d.forget_warmup) * int(config.training.n_iters) + 0.5))
        task.validate(raw_override)
        return task

    def validate(self, raw_override=None) -> None:
        shown = _show(self.label_to_override if raw_override is None else raw_override)
        for k in self.label_to_forget:
            if not 0 <= k < self.n_classes:
                raise ValueError(f"distill.label_to_forget holds {k}, outside [0, {self.n_classes})")
        if self.forgets and self.label_to_override is not None:
            for o in self.label_to_override:
                if not 0 <= o < self.n_classes:
                    raise ValueError(f"distill.label_to_override={shown} is outside [0, {self.n_classes})"
                                     if len(set(self.label_to_override)) == 1 else
                                     f"distill.label_to_override={shown} holds {o}, outside [0, {self.n_classes})")
            if self.n_forget == 1 and self.label_to_override[0] == self.label_to_forget[0]:
                raise ValueError("distill.label_to_override equals distill.label_to_forget")
            inside = [o for o in self.label_to_override if o in self.label_to_forget]
            if inside:
                raise ValueError(f"distill.label_to_override={shown} holds {inside[0]}, one of the forgotten classes "
                                 f"distill.label_to_forget={_show(self.label_to_forget)}")
        if self.forgets and self.label_to_override is None and self.pseudo_label_type not in ("rand", "amax", "prob"):
            raise ValueError(f"distill.pseudo_label_type={self.pseudo_label_type!r}: expected 'rand', 'amax' or "
                             "'prob'")
        if self.forgets and len(self.remain_classes) == 0:
            raise ValueError(f"distill.label_to_forget={_show(self.label_to_forget)} forgets every class")
        if not 0 <= self.t_min < self.t_max <= self.num_timesteps:
            raise ValueError(f"need 0 <= distill.t_min < distill.t_max <= {self.num_timesteps}, "
                             f"got {self.t_min}, {self.t_max}")

    @property
    def forgets(self) -> bool:
        return len(self.label_to_forget) > 0

    @property
    def n_forget(self) -> int:
        """How many classes are forgotten (0: plain SiD)."""
        return len(self.label_to_forget)

    @property
    def uses_classifier(self) -> bool:
        """Override labels come from a classifier on the fake score's x̂ ('amax' / 'prob')."""
        return self.forgets and self.label_to_override is None and self.pseudo_label_type in ("amax", "prob")

    def classifier_labels(self, key, logits: jax.Array) -> jax.Array:
        """Every forgotten class masked to −inf, then argmax ('amax') or a categorical draw ('prob')."""
        masked = list(self.label_to_forget) if self.n_forget > 1 else self.label_to_forget[0]
        logits = logits.astype(jnp.float32).at[:, masked].set(-jnp.inf)
        if self.pseudo_label_type == "amax":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    @property
    def remain_classes(self) -> np.ndarray:
        """int32 [n_classes − n_forget]: the classes that are not forgotten, ascending."""
        return np.array([c for c in range(self.n_classes) if c not in self.label_to_forget], np.int32)

    def remain_labels(self, key, n: int) -> jax.Array:
        """Uniform over the remaining classes (the original draws them from the remain data's labels)."""
        classes = jnp.asarray(self.remain_classes)
        return classes[jax.random.randint(key, (n,), 0, len(self.remain_classes))]

    def forget_labels(self, key, n: int) -> jax.Array:
        """int32 [n]: the forgotten class (one target; ``key`` unused), else uniform over the forgotten set."""
        if self.n_forget == 1:
            return jnp.full((n,), self.label_to_forget[0], jnp.int32)
        classes = jnp.asarray(self.label_to_forget, jnp.int32)
        return classes[jax.random.randint(key, (n,), 0, self.n_forget)]

    def override_labels(self, key, n: int, forget_labels: jax.Array | None = None) -> jax.Array:
        """int32 [n]: the labels the teacher sees on forget samples of classes ``forget_labels`` [n].

        label_to_override: each sample's class's override (one target: the constant); else 'rand': uniform over the
        kept classes — with one target the original's randint(0, 9) with the forgotten class mapped to 9,
        generalised to n_classes."""
        if self.label_to_override is not None:
            if self.n_forget == 1 or len(set(self.label_to_override)) == 1:
                return jnp.full((n,), self.label_to_override[0], jnp.int32)
            table = np.zeros(self.n_classes, np.int32)
            table[list(self.label_to_forget)] = self.label_to_override
            return jnp.asarray(table)[forget_labels]
        if self.n_forget == 1:
            r = jax.random.randint(key, (n,), 0, self.n_classes - 1)
            return jnp.where(r == self.label_to_forget[0], self.n_classes - 1, r).astype(jnp.int32)
        classes = jnp.asarray(self.remain_classes)
        return classes[jax.random.randint(key, (n,), 0, len(self.remain_classes))]

    def timesteps(self, key, n: int) -> jax.Array:
        """t ~ U{t_min, ..., t_max − 1}."""
        return jax.random.randint(key, (n,), self.t_min, self.t_max)

    def forget_timesteps(self, key, n: int, step) -> jax.Array:
        """During forget warmup, t ~ U{int(0.02T+0.5), ..., T − 21}; afterwards as :meth:`timesteps`."""
        lo, hi = int(0.02 * self.num_timesteps + 0.5), self.num_timesteps - 20
        wide = jax.random.randint(key, (n,), lo, hi)
        return jnp.where(step < self.forget_warmup_steps, wide, self.timesteps(key, n))
