"""``python -m sfd_jax.bench --compare=torch``: the PyTorch iterations do what the JAX steps do, and the
side-by-side report runs (on a model small enough for seconds)."""

import numpy as np
import pytest

from tests.conftest import load_config

torch = pytest.importorskip("torch")

from sfd_jax.ddpm import torch_bench as bench_torch  # noqa: E402
from sfd_jax.ddpm import torch_unet  # noqa: E402
from sfd_jax.ddpm import diffusion
from sfd_jax.perf import apply_cpu_xla_flags  # noqa: E402

SMALL = {"model.ch": 32, "model.ch_mult": (1,), "model.attn_resolutions": (), "model.num_res_blocks": 1,
         "data.image_size": 8}


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("fused", [True, False])
def test_torch_sfd_iteration_updates_fake_score_generator_and_ema(fused):
    cfg = load_config("tiny_test", **SMALL, **{"distill.fused": fused})
    _, ac = diffusion.schedule_from_config(cfg)
    it = bench_torch.TorchSFDIteration(cfg, ac, batch=2)
    before = {k: _flat(getattr(it, k)) for k in ("teacher", "generator", "fake", "ema")}
    m = it.step()
    assert np.isfinite(m["sg_total"]) and np.isfinite(m["g_total"])
    after = {k: _flat(getattr(it, k)) for k in before}
    assert torch.equal(before["teacher"], after["teacher"])
    for k in ("generator", "fake", "ema"):
        assert not torch.equal(before[k], after[k]), k
    # β1 = 0 Adam, clip by value: the first update of every parameter is at most lr in size.
    assert float((after["fake"] - before["fake"]).abs().max()) <= float(cfg.sg_optim.lr) * 1.01   # + fp32 rounding of p ~ 1
    assert all(p.requires_grad for p in it.fake.parameters())
    assert [g["betas"][0] for g in it.g_opt.param_groups + it.sg_opt.param_groups] == [0.0, 0.0]


def test_torch_pretrain_iteration():
    cfg = load_config("digits_pretrain", **{"model.attn_resolutions": ()})
    _, ac = diffusion.schedule_from_config(cfg)
    it = bench_torch.TorchPretrainIteration(cfg, ac, batch=4)
    before = _flat(it.model)
    assert np.isfinite(it.step()["loss"])
    assert not torch.equal(before, _flat(it.model))


def test_torch_model_has_our_parameter_count():
    from sfd_jax.models.ddpm_unet import ConditionalUNet, count_params
    cfg = load_config("cifar10_sfd")
    assert torch_unet.count_params(torch_unet.RefConditionalModel(**torch_unet.model_kwargs(cfg))) == \
        count_params(ConditionalUNet.from_config(cfg).init_params(__import__("jax").random.key(0)))


def test_cpu_flags_respect_the_users_setting():
    env = {}
    assert "ynn_fusion_type" in apply_cpu_xla_flags(env)
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert apply_cpu_xla_flags(env) == "--xla_cpu_experimental_ynn_fusion_type=dot"
    env = {"SFD_JAX_NO_CPU_FLAGS": "1"}
    assert apply_cpu_xla_flags(env) == "" and "XLA_FLAGS" not in env


@pytest.mark.parametrize("mode", ["sfd", "pretrain"])
def test_compare_torch_reports_both(mode):
    from sfd_jax.ddpm.bench import compare_torch
    cfg = load_config("tiny_test" if mode == "sfd" else "digits_pretrain", **SMALL)
    if mode == "pretrain":
        cfg.data.image_size = 8
    r = compare_torch(cfg, mode, batch=2, steps=1)
    assert r["jax"]["images_per_s"] > 0 and r["torch"]["images_per_s"] > 0
    assert r["ratio_jax_over_torch"] == pytest.approx(r["jax"]["images_per_s"] / r["torch"]["images_per_s"])
    assert r["torch"]["threads"]["intra_op"] >= 1 and r["jax"]["threads"]["cpus_schedulable"] >= 1


def test_pieces_table_times_every_piece_of_each_level():
    """bench --pieces: one row per piece and level (AttnBlock only where the UNet has attention), positive times."""
    from sfd_jax.ddpm.bench_pieces import shapes_of, time_pieces
    cfg = load_config("tiny_test", **{"model.ch": 32, "model.ch_mult": (1, 2), "model.attn_resolutions": (4,),
                                      "data.image_size": 8})
    shapes = shapes_of(cfg)
    assert shapes == [(8, 32, False), (4, 64, True)]
    rows = time_pieces(shapes, batch=2, repeats=1, emb_dim=8 * 32)
    assert [(r["shape"], r["piece"]) for r in rows] == [
        ("8x8x32", "3x3 conv"), ("8x8x32", "GroupNorm + swish"), ("8x8x32", "ResnetBlock"),
        ("4x4x64", "3x3 conv"), ("4x4x64", "GroupNorm + swish"), ("4x4x64", "ResnetBlock"), ("4x4x64", "AttnBlock")]
    assert all(r["jax_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
