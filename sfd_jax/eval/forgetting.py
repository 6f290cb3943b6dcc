"""Forgetting metrics (the original's ``ua_imagefolder.py`` / ``ua_ddpm.py``) from classifier logits.

For samples generated with conditioning labels ``labels`` and classified into ``logits``:

* per-class accuracy: the fraction of class-``c`` samples the classifier assigns to ``c`` (for the forgotten
  class this is the rate at which the generator *still* produces it; low is good);
* for the forgotten class ``K``: the average softmax **entropy** (natural log), the average **probability** of
  ``K`` and the **accuracy** (argmax == K), over the samples conditioned on ``K``.

Normalisation. By default the three forgotten-class figures are proper averages over the samples conditioned on
``K`` (as ``ua_ddpm.py`` computes them). ``original_normalisation=True`` divides the same sums by the number of
*all* samples, as ``ua_imagefolder.py`` does (its n_total counts every PNG in the folder), which makes the figures
1/10 of the per-class averages when ten classes were sampled equally; use it only to compare with numbers the
original's folder script printed (README: entropy 0.1509, prob 0.00566, acc 0.0036).
"""
from __future__ import annotations

import numpy as np


def softmax_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, K], entropy [N]) from logits [N, K], in float64, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    p = np.exp(logp)
    return p, -np.sum(p * logp, axis=-1)


def forgotten_classes(forget_class) -> tuple[int, ...]:
    """``forget_class`` as a tuple: None / -1 -> (), K -> (K,), a sequence of classes -> its ints."""
    if forget_class is None:
        return ()
    if isinstance(forget_class, (list, tuple, np.ndarray)):
        return tuple(int(k) for k in forget_class)
    return () if int(forget_class) == -1 else (int(forget_class),)


def forgetting_metrics(logits: np.ndarray, labels: np.ndarray, forget_class, *,
                       original_normalisation: bool = False) -> dict:
    """Per-class accuracy and the forgotten class's entropy/probability/accuracy; see the module docstring.

    logits: [N, n_classes] classifier outputs; labels: [N] the classes the samples were conditioned on.
    forget_class: K, None for per-class accuracies only, or a sequence of several forgotten classes: then
    ``forget_class`` is their list, ``mean_accuracy_remaining`` the mean over the classes not forgotten,
    ``forgotten_per_class`` each forgotten class's figures (as ``forgotten`` of a single-class result) and
    ``forgotten`` those of all their samples together (accuracy = recognised as the class they were conditioned on).
    """
    several = forgotten_classes(forget_class)
    if isinstance(forget_class, (list, tuple, np.ndarray)) and len(several) == 1:
        forget_class = several[0]
    elif isinstance(forget_class, (list, tuple, np.ndarray)):
        return _several_forgotten(logits, labels, several, original_normalisation)
    logits = np.asarray(logits)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    n, k = logits.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"sample label {int(labels.max() if labels.max() >= k else labels.min())} is outside "
                         f"the classifier's classes [0, {k})")
    probs, entropy = softmax_stats(logits)
    pred = probs.argmax(-1)
    per_class = {}
    for c in np.unique(labels):
        m = labels == c
        per_class[str(int(c))] = {
            "n": int(m.sum()),
            "accuracy": float(np.mean(pred[m] == c)),
            "mean_prob": float(np.mean(probs[m, c])),
            "mean_entropy": float(np.mean(entropy[m])),
        }
    out = {
        "n_images": int(n),
        "n_classes": int(k),
        "per_class": per_class,
        "mean_accuracy_all": float(np.mean([v["accuracy"] for v in per_class.values()])),
        "forget_class": None if forget_class is None else int(forget_class),
    }
    if forget_class is None:
        return out
    kf = int(forget_class)
    if not 0 <= kf < k:
        raise ValueError(f"forget class {kf} is outside the classifier's classes [0, {k})")
    remaining = [v["accuracy"] for c, v in per_class.items() if int(c) != kf]
    out["mean_accuracy_remaining"] = float(np.mean(remaining)) if remaining else None
    m = labels == kf
    n_k = int(m.sum())
    sums = {"entropy": float(np.sum(entropy[m])), "prob": float(np.sum(probs[m, kf])),
            "acc": float(np.sum(pred[m] == kf))}
    denom = n if original_normalisation else n_k
    forgotten = {"n": n_k, "normalisation": "all_images" if original_normalisation else "per_class"}
    forgotten.update({key: (s / denom if denom else None) for key, s in sums.items()})
    out["forgotten"] = forgotten
    return out


def _several_forgotten(logits, labels, classes: tuple[int, ...], original_normalisation: bool) -> dict:
    """:func:`forgetting_metrics` for two or more forgotten ``classes`` (distinct, inside the classifier's)."""
    if len(set(classes)) != len(classes):
        raise ValueError(f"forget classes {classes} list a class twice")
    out = forgetting_metrics(logits, labels, None)
    k = out["n_classes"]
    bad = [c for c in classes if not 0 <= c < k]
    if bad:
        raise ValueError(f"forget class {bad[0]} is outside the classifier's classes [0, {k})")
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    per_class = {str(c): forgetting_metrics(logits, labels, c, original_normalisation=original_normalisation)
                 ["forgotten"] for c in classes}
    remaining = [v["accuracy"] for c, v in out["per_class"].items() if int(c) not in classes]
    probs, entropy = softmax_stats(logits)
    m = np.isin(labels, classes)
    n_k = int(m.sum())
    denom = len(labels) if original_normalisation else n_k
    own = probs[np.flatnonzero(m), labels[m]]
    sums = {"entropy": float(np.sum(entropy[m])), "prob": float(np.sum(own)),
            "acc": float(np.sum(probs[m].argmax(-1) == labels[m]))}
    forgotten = {"n": n_k, "normalisation": "all_images" if original_normalisation else "per_class"}
    forgotten.update({key: (s / denom if denom else None) for key, s in sums.items()})
    out.update(forget_class=list(classes), mean_accuracy_remaining=float(np.mean(remaining)) if remaining else None,
               forgotten=forgotten, forgotten_per_class=per_class)
    return out


def format_table(result: dict) -> str:
    """A plain-text summary of :func:`forgetting_metrics`'s result."""
    kf = result.get("forget_class")
    forgotten = set(forgotten_classes(kf))
    lines = [f"{'class':>6} {'n':>6} {'accuracy':>9} {'mean_prob':>10} {'entropy':>8}"]
    for c, v in sorted(result["per_class"].items(), key=lambda kv: int(kv[0])):
        mark = "  <- forgotten" if int(c) in forgotten else ""
        lines.append(f"{c:>6} {v['n']:>6} {v['accuracy']:>9.4f} {v['mean_prob']:>10.4f} "
                     f"{v['mean_entropy']:>8.4f}{mark}")
    if kf is not None:
        f = result["forgotten"]
        if result.get("mean_accuracy_remaining") is not None:
            lines.append(f"remaining classes: mean accuracy {result['mean_accuracy_remaining']:.4f}")
        if isinstance(kf, list):
            for c, g in result["forgotten_per_class"].items():
                lines.append(f"forgotten class {c} ({g['normalisation']} normalisation, {g['n']} samples): "
                             + (f"entropy {g['entropy']:.4f}  prob {g['prob']:.5f}  acc {g['acc']:.4f}" if g["n"]
                                else "no samples conditioned on it"))
        elif f["n"]:
            lines.append(f"forgotten class {kf} ({f['normalisation']} normalisation, {f['n']} samples): "
                         f"entropy {f['entropy']:.4f}  prob {f['prob']:.5f}  acc {f['acc']:.4f}")
        else:
            lines.append(f"forgotten class {kf}: no samples conditioned on it")
    return "\n".join(lines)


def check_classifier_fits(clf_config, image_shape, what: str, clf_path: str) -> None:
    """One-line UsageError when the classifier was made for other images than ``image_shape`` (H, W, C)."""
    from sfd_jax.cli_utils import UsageError
    h, w, c = image_shape
    if c != clf_config.channels:
        raise UsageError(f"classifier {clf_path} takes {clf_config.channels}-channel images but {what} have {c}")
    if clf_config.input_size is None and (h, w) != (clf_config.image_size, clf_config.image_size):
        raise UsageError(f"classifier {clf_path} was trained on {clf_config.image_size}x{clf_config.image_size} "
                         f"images but {what} are {h}x{w}")


def score_samples(clf, clf_path: str, images: np.ndarray, labels: np.ndarray, forget_class, *,
                  batch_size: int = 256, progress: bool = True, original_normalisation: bool = False) -> dict:
    """:func:`forgetting_metrics` of the loaded classifier ``clf`` on uint8 images [N,H,W,C] conditioned on
    ``labels``; UsageError when the classifier does not take these images or gives NaN/inf logits."""
    from sfd_jax.cli_utils import UsageError
    from sfd_jax.eval.classifier_train import predict_logits

    check_classifier_fits(clf.config, images.shape[1:], "the samples", clf_path)
    logits = predict_logits(clf.config, clf.variables, images, batch_size=batch_size, progress=progress)
    if not np.isfinite(logits).all():
        raise UsageError(f"classifier {clf_path} gives NaN/inf logits for "
                         f"{int((~np.isfinite(logits).all(-1)).sum())} of {len(logits)} images; refusing to score them")
    return forgetting_metrics(logits, labels, forget_class, original_normalisation=original_normalisation)
