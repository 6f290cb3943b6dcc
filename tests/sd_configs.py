"""The real Stable Diffusion component configs (as in the Hub repos' config.json files), for shape-only tests.

SD 1.5's live in :mod:`sfd_jax.sd.random_pipeline` (re-exported here); SD 2.1's UNet differs in a few keys."""

from sfd_jax.sd.random_pipeline import CLIP_VIT_L14_TEXT, SD15_UNET, SD_VAE

__all__ = ["CLIP_VIT_L14_TEXT", "SD15_UNET", "SD21_UNET", "SD_VAE"]

SD21_UNET = {
    **SD15_UNET, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
}
