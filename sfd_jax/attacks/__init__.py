"""Attacks that try to bring a forgotten class or concept back (``python -m sfd_jax.evaluate attack --kind=...``).

Every attack optimises against one classifier (the *attacker*) and is judged by another, independently trained one
(the *judge*, a different architecture and seed): :func:`sfd_jax.attacks.spec.check_judge` refuses the same
classifier for both. Results are :class:`sfd_jax.attacks.spec.AttackResult` (JSON + CSV).
"""
