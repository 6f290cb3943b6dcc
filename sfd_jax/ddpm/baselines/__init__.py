"""The original release's comparison methods as training modes of ``python -m sfd_jax.train``
(README: "The original release and our differences" › Baselines).

One small module per method, each holding pure steps ``step(state, ..., root_key) -> (state, metrics)`` built like
:mod:`sfd_jax.ddpm.steps`: randomness only from ``fold_in(root_key, state.step)``, random arrays drawn at
global-batch shape and constrained to the batch sharding, every mean over the global batch.

=============  ====================================================================================
mode           what
=============  ====================================================================================
retrain        a fresh class-conditional DDPM on the remaining classes only (:mod:`.retrain`)
sa_fim, sa     Selective Amnesia: the Fisher diagonal on self-generated replay, then forgetting (:mod:`.sa`)
salun_mask,    SalUn: the saliency mask from the forget-class gradient, then masked random-label or
salun          gradient-ascent unlearning (:mod:`.salun`)
esd            ESD: negative-guidance fine-tuning on partial DDIM trajectories (:mod:`.esd`)
=============  ====================================================================================

The adapters that drive these steps through the one host loop live in :mod:`sfd_jax.ddpm.baseline_trainer`.
"""
BASELINE_MODES = ("retrain", "sa_fim", "sa", "salun_mask", "salun", "esd")
# Modes whose result is an artifact (a Fisher diagonal, a mask), not a network.
ARTIFACT_MODES = ("sa_fim", "salun_mask")
