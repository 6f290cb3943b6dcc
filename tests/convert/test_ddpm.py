"""Original .pth <-> our parameters and checkpoints: layouts, list formats, round trips, refusals, errors."""
import io
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from sfd_jax.convert import load_seed_ddpm_checkpoint
from sfd_jax.convert.ddpm import (CheckpointMismatchError, check_params, flax_path_to_torch_key,
                                  params_to_state_dict, state_dict_to_params, torch_key_to_flax_path)
from sfd_jax.convert.torch_pickle import UnsafeCheckpointError
from sfd_jax.ddpm.networks import abstract_params
from sfd_jax.models.ddpm_unet import ConditionalUNet
from tests.conftest import last_line, load_config, run_cli


@pytest.fixture(scope="module")
def tiny_params():
    cfg = load_config("tiny_test")
    return cfg, ConditionalUNet.from_config(cfg).init_params(jax.random.key(7))


def test_every_cifar10_name_maps_both_ways():
    shapes = abstract_params(load_config("cifar10_sfd"))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    names = set()
    for kp, leaf in flat:
        path = tuple(k.key for k in kp)
        key = flax_path_to_torch_key(path)
        names.add(key)
        assert torch_key_to_flax_path(key, len(leaf.shape)) == path
    for key in ["null_classes_emb", "temb.dense.0.weight", "classes_emb.weight", "cemb.dense.1.bias",
                "conv_in.weight", "down.1.block.0.nin_shortcut.weight", "down.1.attn.1.proj_out.weight",
                "down.2.downsample.conv.weight", "mid.block_1.temb_cemb_proj.weight", "mid.attn_1.q.bias",
                "up.3.block.2.norm2.weight", "up.1.attn.2.k.weight", "up.1.upsample.conv.bias",
                "norm_out.weight", "conv_out.bias"]:
        assert key in names


def test_state_dict_round_trip_is_bitwise(tiny_params):
    _, params = tiny_params
    sd = params_to_state_dict(params)
    assert sd["conv_in.weight"].shape == (32, 3, 3, 3)                 # OIHW
    assert sd["temb.dense.0.weight"].shape == (128, 32)                # (out, in)
    assert sd["classes_emb.weight"].shape == (10, 32)
    back = state_dict_to_params({"module." + k: v for k, v in sd.items()})   # DDP prefixes are stripped
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(back)


def test_shape_mismatch_names_the_first_parameter(tiny_params):
    cfg, params = tiny_params
    wider = load_config("tiny_test", **{"model.ch": 64})
    with pytest.raises(CheckpointMismatchError, match=r"'null_classes_emb' has shape \(32,\).*\(64,\)"):
        check_params(params, abstract_params(wider))
    deeper = load_config("tiny_test", **{"model.num_res_blocks": 2})
    with pytest.raises(CheckpointMismatchError, match=r"lacks parameter 'down.0.block.1"):
        check_params(params, abstract_params(deeper))


def _torch_zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_referencing_other_globals_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    ckpt.write_bytes(_torch_zip(pickle.dumps([{"w": _Evil(sentinel)}, None, 0, None], protocol=2)))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*system"):
        load_seed_ddpm_checkpoint(ckpt)
    assert not sentinel.exists()
    proc = run_cli("sfd_jax.sample", f"--checkpoint={ckpt}", "--config=tests/configs/tiny_test.py",
                   f"--out={tmp_path / 'o.npz'}")
    assert proc.returncode != 0 and "refusing to load" in last_line(proc.stderr)
    assert not sentinel.exists() and not (tmp_path / "o.npz").exists()


# ------------------------------------------------------------------------------------------ needs torch
@pytest.mark.torch
@pytest.mark.parametrize("layout", ["pretrained4", "pretrained3", "distilled", "early_stage", "bare"])
def test_original_list_layouts(tmp_path, tiny_params, layout):
    torch = pytest.importorskip("torch")
    _, params = tiny_params
    sd = {k: torch.from_numpy(v.copy()) for k, v in params_to_state_dict(params).items()}
    obj = {"pretrained4": [sd, {"state": {}, "param_groups": []}, 12, sd], "pretrained3": [sd, None, 12],
           "distilled": [sd, None, sd, None, 4999, sd], "early_stage": [None, None, sd, None, 0, sd],
           "bare": sd}[layout]
    torch.save(obj, tmp_path / "c.pth")
    nets = load_seed_ddpm_checkpoint(tmp_path / "c.pth")
    expected_present = {"pretrained4": {"model", "ema"}, "pretrained3": {"model"}, "bare": {"model"},
                        "distilled": {"fake_score", "generator", "generator_ema"},
                        "early_stage": {"generator", "generator_ema"}}[layout]
    assert {k for k, v in nets.items() if v is not None} == expected_present
    for name in expected_present:
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(nets[name])):
            np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.torch
def test_ours_to_pth_to_ours_is_bitwise_and_loads_in_torch(tmp_path, tiny_params):
    torch = pytest.importorskip("torch")
    from sfd_jax.convert import save_seed_ddpm_checkpoint
    from tests.torch_reference import RefConditionalModel
    cfg, params = tiny_params
    ema = jax.tree_util.tree_map(lambda p: p * 0.5, params)
    save_seed_ddpm_checkpoint(tmp_path / "pre.pth", model=params, ema=ema, step=77)
    save_seed_ddpm_checkpoint(tmp_path / "dist.pth", fake_score=params, generator=ema, generator_ema=params, step=9)
    pre, dist = load_seed_ddpm_checkpoint(tmp_path / "pre.pth"), load_seed_ddpm_checkpoint(tmp_path / "dist.pth")
    for got, want in [(pre["model"], params), (pre["ema"], ema), (dist["fake_score"], params),
                      (dist["generator"], ema), (dist["generator_ema"], params)]:
        for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # The original code's loading path: a strict load_state_dict into the architecture, and Adam's resume.
    m, d = cfg.model, cfg.data
    ref = RefConditionalModel(ch=m.ch, out_ch=m.out_ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
                              attn_resolutions=m.attn_resolutions, dropout=m.dropout, in_channels=m.in_channels,
                              resolution=d.image_size, n_classes=d.n_classes)
    states = torch.load(tmp_path / "pre.pth", weights_only=True)
    assert len(states) == 4 and states[2] == 77
    ref.load_state_dict(states[0], strict=True)
    torch.optim.Adam(ref.parameters(), lr=2e-4).load_state_dict(states[1])
    states = torch.load(tmp_path / "dist.pth", weights_only=True)
    assert len(states) == 6 and states[4] == 9 and states[1] is None
    ref.load_state_dict(states[5], strict=True)


@pytest.mark.torch
def test_convert_cli_then_sample_equals_sampling_the_pth(tmp_path, tiny_params):
    torch = pytest.importorskip("torch")
    from sfd_jax.convert import save_seed_ddpm_checkpoint
    _, params = tiny_params
    save_seed_ddpm_checkpoint(tmp_path / "g.pth", fake_score=params, generator=params, generator_ema=params,
                              step=4999)
    out = tmp_path / "run"
    run_cli("sfd_jax.convert", "ddpm", f"--src={tmp_path / 'g.pth'}", "--config=tests/configs/tiny_test.py",
            f"--out={out}", check=True)
    assert (out / "checkpoints" / "4999" / "generator_ema").is_dir()
    common = ["--classes=1,2", "--n_per_class=3", "--seed=5"]
    run_cli("sfd_jax.sample", f"--checkpoint={out}", f"--out={tmp_path / 'a.npz'}", *common, check=True)
    run_cli("sfd_jax.sample", f"--checkpoint={tmp_path / 'g.pth'}", "--config=tests/configs/tiny_test.py",
            f"--out={tmp_path / 'b.npz'}", *common, check=True)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["images"], b["images"])
    # ... and back to a .pth, bitwise.
    run_cli("sfd_jax.convert", "ddpm-to-pth", f"--checkpoint={out}", f"--out={tmp_path / 'back.pth'}", check=True)
    back = load_seed_ddpm_checkpoint(tmp_path / "back.pth")
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back["generator_ema"])):
        np.testing.assert_array_equal(np.asarray(x), y)
    # A wrong config is a one-line error naming the parameter; nothing is written.
    proc = run_cli("sfd_jax.convert", "ddpm", f"--src={tmp_path / 'g.pth'}", "--config=configs/cifar10_sfd.py",
                   f"--out={tmp_path / 'bad'}")
    assert proc.returncode == 2 and "null_classes_emb" in last_line(proc.stderr)
    assert not (tmp_path / "bad").exists()


@pytest.mark.torch
def test_state_dict_order_is_the_originals(tiny_params):
    pytest.importorskip("torch")
    from tests.torch_reference import RefConditionalModel
    cfg, params = tiny_params
    m, d = cfg.model, cfg.data
    ref = RefConditionalModel(ch=m.ch, out_ch=m.out_ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
                              attn_resolutions=m.attn_resolutions, dropout=m.dropout, in_channels=m.in_channels,
                              resolution=d.image_size, n_classes=d.n_classes)
    assert list(params_to_state_dict(params)) == list(ref.state_dict())
