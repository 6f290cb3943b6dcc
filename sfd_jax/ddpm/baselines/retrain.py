"""Retrain: a class-conditional DDPM trained from scratch on the remaining classes only — the model that never
saw the forgotten class, the gold standard the other methods are measured against
(README: "The original release and our differences" › Baselines).

The step is the pretraining step itself (ε-MSE summed over pixels, antithetic t, label dropout
``model.cond_drop_prob`` 0.1, dropout on, global-norm clipping, Adam, EMA); only the data differs: the batch
stream keeps the images whose label is not ``unlearn.label_to_forget`` (:func:`retrain_stream`).
"""
from __future__ import annotations

from sfd_jax.ddpm.baselines.common import remain_classes
from sfd_jax.ddpm.steps import make_pretrain_step

make_retrain_step = make_pretrain_step


def retrain_stream(dataset, config, **kw):
    """The resumable batch stream of the remaining classes' images (see :class:`sfd_jax.data.BatchStream`)."""
    from sfd_jax.data import BatchStream
    return BatchStream.from_config(dataset, config, labels_keep=remain_classes(config), **kw)
