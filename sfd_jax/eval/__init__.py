"""Evaluation: forgetting metrics with a classifier, and FID/sFID/IS/precision/recall with a Flax Inception-v3.

Modules: :mod:`~sfd_jax.eval.classifier_train` (train/save/load/apply classifiers), :mod:`~sfd_jax.eval.forgetting`
(per-class accuracy and forgotten-class entropy/probability/accuracy), :mod:`~sfd_jax.eval.inception` (the FID
Inception network and its weight converter), :mod:`~sfd_jax.eval.metrics` (FID, sFID, IS, precision/recall,
reference statistics) and :mod:`~sfd_jax.eval.samples` (reading sample folders and npz files).
"""
