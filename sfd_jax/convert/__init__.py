"""Checkpoint and weight conversion: original ``.pth`` files (read without torch), and our Orbax format."""
from sfd_jax.convert.ddpm import (CheckpointMismatchError, load_seed_ddpm_checkpoint, read_seed_ddpm_checkpoint,
                                  save_seed_ddpm_checkpoint)

__all__ = ["CheckpointMismatchError", "load_seed_ddpm_checkpoint", "read_seed_ddpm_checkpoint",
           "save_seed_ddpm_checkpoint"]
