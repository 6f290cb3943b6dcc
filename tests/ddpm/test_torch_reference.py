"""Tests of the PyTorch reference itself (tests/torch_reference.py) against the original's network, schedule and
samplers (README: "The original release and our differences" › DDPM network)."""

import math

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from tests.torch_reference import (  # noqa: E402
    CIFAR10_KW,
    STL10_KW,
    RefConditionalModel,
    count_params,
    ref_alphas_cumprod,
    ref_compute_alpha,
    ref_ddim,
    ref_ddpm,
    ref_get_beta_schedule,
    ref_one_step,
    ref_seq,
    ref_timestep_embedding,
)

TINY_KW = dict(
    ch=32,
    out_ch=3,
    ch_mult=(1, 2),
    num_res_blocks=2,
    attn_resolutions=(8,),
    dropout=0.1,
    in_channels=3,
    resolution=16,
    n_classes=10,
)


def _module_counts(model):
    """Parameter elements per top-level group: 'temb', 'down.1', 'mid.attn_1', ..."""
    counts = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("down", "up", "mid") else parts[0]
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


@pytest.fixture(scope="module")
def cifar_model():
    torch.manual_seed(0)
    return RefConditionalModel(**CIFAR10_KW)


@pytest.fixture(scope="module")
def stl_model():
    torch.manual_seed(0)
    return RefConditionalModel(**STL10_KW)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return RefConditionalModel(**TINY_KW).eval()


def _tiny_inputs(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.tensor([0.0, 38.0, 440.5, 999.0])[:b]
    c = torch.arange(b) % 10
    return x, t, c


# ---------------------------------------------------------------- parameter counts


def test_cifar10_param_count(cifar_model):
    assert count_params(cifar_model) == 38_632_323
    assert len(list(cifar_model.parameters())) == 334
    assert len(cifar_model.state_dict()) == 334  # no buffers


def test_cifar10_breakdown(cifar_model):
    expected = {
        "null_classes_emb": 128, "temb": 328_704, "classes_emb": 1_280, "cemb": 328_704,
        "conv_in": 3_584,
        "down.0": 1_001_344, "down.1": 3_742_464, "down.2": 3_477_248, "down.3": 2_887_168,
        "mid.block_1": 1_443_584, "mid.attn_1": 263_680, "mid.block_2": 1_443_584,
        "up.0": 1_986_560, "up.1": 7_548_928, "up.2": 7_085_824, "up.3": 7_085_824,
        "norm_out": 256, "conv_out": 3_459,
    }
    assert _module_counts(cifar_model) == expected


def test_stl10_param_count_and_breakdown(stl_model):
    assert count_params(stl_model) == 83_159_683
    assert len(list(stl_model.parameters())) == 396
    counts = _module_counts(stl_model)
    expected = {
        "null_classes_emb": 128, "temb": 328_704, "classes_emb": 1_280, "cemb": 328_704,
        "conv_in": 3_584,
        "down.0": 1_001_344, "down.1": 3_215_104, "down.2": 4_004_608, "down.3": 3_477_248,
        "down.4": 9_444_352,
        "mid.block_1": 5_246_464, "mid.attn_1": 1_051_648, "mid.block_2": 5_246_464,
        "up.0": 1_986_560, "up.1": 6_757_888, "up.2": 7_876_864, "up.3": 7_741_696,
        "up.4": 25_443_328,
        "norm_out": 256, "conv_out": 3_459,
    }
    assert counts == expected
    sd = stl_model.state_dict()
    # the STL-10 layout
    assert "down.4.downsample.conv.weight" not in sd
    assert sd["down.4.block.0.nin_shortcut.weight"].shape == (512, 256, 1, 1)
    assert sd["mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["up.4.block.0.conv1.weight"].shape == (512, 1024, 3, 3)
    assert sd["up.4.block.2.conv1.weight"].shape == (512, 768, 3, 3)
    assert sd["up.3.block.0.conv1.weight"].shape == (256, 768, 3, 3)
    assert len([k for k in sd if k.startswith("down.2.attn.") and k.endswith("q.weight")]) == 2
    assert len([k for k in sd if k.startswith("up.2.attn.") and k.endswith("q.weight")]) == 3
    assert not any(k.startswith(("down.1.attn", "up.1.attn", "down.3.attn", "up.3.attn")) for k in sd)


# ---------------------------------------------------------------- state_dict naming


def _expected_keys(L, num_res_blocks, attn_levels, nin_down, nin_up):
    """The original's naming scheme in named_parameters order."""
    keys = ["null_classes_emb"]
    keys += [f"temb.dense.{k}.{w}" for k in (0, 1) for w in ("weight", "bias")]
    keys += ["classes_emb.weight"]
    keys += [f"cemb.dense.{k}.{w}" for k in (0, 1) for w in ("weight", "bias")]
    keys += ["conv_in.weight", "conv_in.bias"]

    def block(prefix, nin):
        mods = ["norm1", "conv1", "temb_cemb_proj", "norm2", "conv2"] + (["nin_shortcut"] if nin else [])
        return [f"{prefix}.{m}.{w}" for m in mods for w in ("weight", "bias")]

    def attn(prefix):
        return [f"{prefix}.{m}.{w}" for m in ("norm", "q", "k", "v", "proj_out") for w in ("weight", "bias")]

    for i in range(L):
        for j in range(num_res_blocks):
            keys += block(f"down.{i}.block.{j}", (i, j) in nin_down)
        if i in attn_levels:
            for j in range(num_res_blocks):
                keys += attn(f"down.{i}.attn.{j}")
        if i < L - 1:
            keys += [f"down.{i}.downsample.conv.weight", f"down.{i}.downsample.conv.bias"]
    keys += block("mid.block_1", False) + attn("mid.attn_1") + block("mid.block_2", False)
    for i in range(L):
        for j in range(num_res_blocks + 1):
            keys += block(f"up.{i}.block.{j}", (i, j) in nin_up)
        if i in attn_levels:
            for j in range(num_res_blocks + 1):
                keys += attn(f"up.{i}.attn.{j}")
        if i > 0:
            keys += [f"up.{i}.upsample.conv.weight", f"up.{i}.upsample.conv.bias"]
    keys += ["norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias"]
    return keys


def test_cifar10_state_dict_names_and_order(cifar_model):
    # every up block changes channels (concat input), so all have nin_shortcut
    nin_up = {(i, j) for i in range(4) for j in range(3)}
    expected = _expected_keys(4, 2, attn_levels={1}, nin_down={(1, 0)}, nin_up=nin_up)
    assert list(cifar_model.state_dict().keys()) == expected
    assert [n for n, _ in cifar_model.named_parameters()] == expected


def test_stl10_state_dict_names_and_order(stl_model):
    nin_up = {(i, j) for i in range(5) for j in range(3)}
    expected = _expected_keys(5, 2, attn_levels={2}, nin_down={(1, 0), (4, 0)}, nin_up=nin_up)
    assert list(stl_model.state_dict().keys()) == expected


def test_cifar10_shapes(cifar_model):
    sd = cifar_model.state_dict()
    assert sd["null_classes_emb"].shape == (128,)
    assert sd["temb.dense.0.weight"].shape == (512, 128)
    assert sd["temb.dense.1.weight"].shape == (512, 512)
    assert sd["classes_emb.weight"].shape == (10, 128)
    assert sd["cemb.dense.1.bias"].shape == (512,)
    assert sd["conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["down.1.block.0.temb_cemb_proj.weight"].shape == (256, 1024)
    assert sd["down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["down.1.attn.0.q.weight"].shape == (256, 256, 1, 1)
    assert sd["down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert sd["up.1.block.2.conv1.weight"].shape == (256, 384, 3, 3)  # (256+128) -> 256
    assert sd["up.0.block.0.conv1.weight"].shape == (128, 384, 3, 3)  # (256+128) -> 128
    assert sd["up.3.upsample.conv.weight"].shape == (256, 256, 3, 3)
    assert sd["conv_out.weight"].shape == (3, 128, 3, 3)
    assert "up.0.upsample.conv.weight" not in sd
    assert "down.3.downsample.conv.weight" not in sd


def test_class_embedding_width_is_4ch(tiny_model):
    # deliberate difference from the original (hard-coded 512): temb_cemb_proj is Linear(8ch -> out)
    sd = tiny_model.state_dict()
    assert sd["down.0.block.0.temb_cemb_proj.weight"].shape == (32, 256)
    assert sd["mid.block_1.temb_cemb_proj.weight"].shape == (64, 256)


# ---------------------------------------------------------------- forward / CFG


def test_tiny_forward_shape(tiny_model):
    x, t, c = _tiny_inputs()
    out = tiny_model(x, t, c, "train")
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out = tiny_model(x, t, c, "test", cond_scale=2.0)
    assert out.shape == x.shape


def test_forward_rejects_wrong_resolution_and_mode(tiny_model):
    x, t, c = _tiny_inputs()
    with pytest.raises(AssertionError):
        tiny_model(torch.zeros(4, 3, 8, 8), t, c, "train")
    with pytest.raises(ValueError):
        tiny_model(x, t, c, "sample")
    with pytest.raises(ValueError):
        tiny_model(x, t, c, "test")  # cond_scale is required


def test_guidance_identity(tiny_model):
    x, t, c = _tiny_inputs()
    s = 1.7
    cond = tiny_model(x, t, c, "test", cond_scale=0)
    null = tiny_model(x, t, c, "train", cond_drop_prob=1.0)
    guided = tiny_model(x, t, c, "test", cond_scale=s)
    torch.testing.assert_close(guided, (1 + s) * cond - s * null, rtol=1e-5, atol=1e-5)
    # cond_scale == 0 is the plain conditional pass (same as train mode with no dropping)
    torch.testing.assert_close(cond, tiny_model(x, t, c, "train", cond_drop_prob=0.0))
    assert not torch.allclose(cond, null)


def test_cond_drop_mask_semantics(tiny_model):
    x, t, c = _tiny_inputs()
    cond = tiny_model(x, t, c, "train", cond_drop_prob=0.0)
    null = tiny_model(x, t, c, "train", cond_drop_prob=1.0)
    # True = DROP; the mask overrides cond_drop_prob
    all_drop = tiny_model(x, t, c, "train", cond_drop_prob=0.0, cond_drop_mask=torch.ones(4, dtype=torch.bool))
    none_drop = tiny_model(x, t, c, "train", cond_drop_prob=1.0, cond_drop_mask=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(all_drop, null)
    torch.testing.assert_close(none_drop, cond)
    mask = torch.tensor([True, False, True, False])
    mixed = tiny_model(x, t, c, "train", cond_drop_mask=mask)
    torch.testing.assert_close(mixed[mask], null[mask])
    torch.testing.assert_close(mixed[~mask], cond[~mask])
    # null output does not depend on the label
    null2 = tiny_model(x, t, (c + 3) % 10, "train", cond_drop_prob=1.0)
    torch.testing.assert_close(null, null2)
    # test mode with a mask: (1+s)*masked - s*null
    s = 0.5
    guided = tiny_model(x, t, c, "test", cond_drop_mask=mask, cond_scale=s)
    torch.testing.assert_close(guided, (1 + s) * mixed - s * null, rtol=1e-5, atol=1e-5)


def test_train_mode_default_cond_drop_prob():
    torch.manual_seed(0)
    model = RefConditionalModel(**dict(TINY_KW, dropout=0.0), cond_drop_prob=1.0).eval()
    x, t, c = _tiny_inputs()
    null = model(x, t, c, "train", cond_drop_prob=1.0)
    # train mode: None -> the constructor default (1.0 here, so everything dropped)
    torch.testing.assert_close(model(x, t, c, "train"), null)
    # test mode: None -> 0.0 (nothing dropped), regardless of the constructor default
    cond = model(x, t, c, "train", cond_drop_prob=0.0)
    torch.testing.assert_close(model(x, t, c, "test", cond_scale=0), cond)


def test_random_cond_drop_rate():
    torch.manual_seed(0)
    model = RefConditionalModel(**TINY_KW)
    keep = model._keep_mask(100_000, torch.device("cpu"), 0.1, None)
    assert abs(keep.float().mean().item() - 0.9) < 0.01


def test_dropout_only_in_train_state(tiny_model):
    x, t, c = _tiny_inputs()
    tiny_model.eval()
    a = tiny_model(x, t, c, "train")
    b = tiny_model(x, t, c, "train")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    tiny_model.train()
    torch.manual_seed(3)
    d1 = tiny_model(x, t, c, "train")
    d2 = tiny_model(x, t, c, "train")
    assert not torch.allclose(d1, d2)
    assert not torch.allclose(d1, a)
    tiny_model.eval()


def test_timestep_embedding():
    t = torch.tensor([0.0, 1.0, 440.5])
    emb = ref_timestep_embedding(t, 128)
    assert emb.shape == (3, 128)
    half = 64
    freqs = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
    expect = np.concatenate([np.sin(440.5 * freqs), np.cos(440.5 * freqs)])
    np.testing.assert_allclose(emb[2].numpy(), expect, rtol=0, atol=2e-4)
    np.testing.assert_allclose(emb[0].numpy(), np.r_[np.zeros(half), np.ones(half)])
    # first frequency is 1, last is 1/10000
    np.testing.assert_allclose(emb[1, 0].item(), math.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(emb[1, half - 1].item(), math.sin(1e-4), rtol=1e-4)


# ---------------------------------------------------------------- schedules


def test_beta_schedules():
    T = 1000
    lin = ref_get_beta_schedule("linear", 1e-4, 0.02, T)
    assert lin.dtype == np.float64 and lin.shape == (T,)
    assert lin[0] == 1e-4 and abs(lin[-1] - 0.02) < 1e-15
    quad = ref_get_beta_schedule("quad", 1e-4, 0.02, T)
    np.testing.assert_allclose(np.sqrt(quad), np.linspace(0.01, math.sqrt(0.02), T))
    np.testing.assert_array_equal(ref_get_beta_schedule("const", 1e-4, 0.02, T), np.full(T, 0.02))
    jsd = ref_get_beta_schedule("jsd", 1e-4, 0.02, T)
    assert jsd[0] == 1.0 / T and jsd[-1] == 1.0
    sig = ref_get_beta_schedule("sigmoid", 1e-4, 0.02, T)
    assert 1e-4 < sig[0] < sig[-1] < 0.02
    np.testing.assert_allclose(sig[0], 1 / (1 + math.exp(6)) * (0.02 - 1e-4) + 1e-4)
    with pytest.raises(NotImplementedError):
        ref_get_beta_schedule("cosine", 1e-4, 0.02, T)


def test_alphas_cumprod_handy_values():
    abar = ref_alphas_cumprod(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000))
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    a = abar.double()
    assert round(a[38].item(), 6) == 0.981507
    assert round(a[38].sqrt().item(), 6) == 0.990710
    assert round((1 - a[38]).sqrt().item(), 6) == 0.135989
    assert round(a[440].item(), 6) == 0.137710
    assert round(a[711].item(), 6) == 0.005871
    assert round(a[20].item(), 6) == 0.993735
    assert round(a[979].item(), 7) == 6.02e-5
    # init_a, init_b, init_sigma at t_init = 440 (float32 arithmetic, as in the runner)
    abar440 = abar[440]
    assert round(abar440.sqrt().item(), 6) == 0.371093
    assert round((1 - abar440).sqrt().item(), 6) == 0.928596
    assert round((1 / abar440 - 1).sqrt().item(), 6) == 2.502326


def test_alphas_cumprod_is_float32_product():
    betas = ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)
    abar = ref_alphas_cumprod(betas)
    expect = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)
    # same float32 ops; tolerance only for accumulation order
    np.testing.assert_allclose(abar.numpy(), expect, rtol=2e-6)
    torch.testing.assert_close(ref_alphas_cumprod(torch.from_numpy(betas)), abar, rtol=0, atol=0)


def test_compute_alpha():
    betas = torch.from_numpy(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)).float()
    abar = ref_alphas_cumprod(betas)
    a = ref_compute_alpha(betas, torch.tensor([-1.0, 0.0, 440.0, 999.0]))
    assert a.shape == (4, 1, 1, 1)
    assert a[0].item() == 1.0
    torch.testing.assert_close(a[1:].flatten(), abar[[0, 440, 999]], rtol=0, atol=0)


# ---------------------------------------------------------------- samplers


def test_ref_seq():
    assert ref_seq("uniform", 1000, 1000) == list(range(1000))
    assert ref_seq("uniform", 10, 1000) == list(range(0, 1000, 100))
    assert ref_seq("uniform", 3, 1000) == list(range(0, 1000, 333))  # 0, 333, 666, 999
    q = ref_seq("quad", 10, 1000)
    assert len(q) == 10 and q[0] == 0 and q[-1] == 800
    assert q == [int(s) for s in np.linspace(0, math.sqrt(800), 10) ** 2]
    assert all(a <= b for a, b in zip(q, q[1:]))


class _Recorder:
    """A stand-in model that records its calls and returns a fixed function of its inputs."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, x, t, c, mode, **kw):
        self.calls.append(dict(t=t.clone(), mode=mode, **kw))
        return self.fn(x, t, c)


def test_one_step_matches_formula(tiny_model):
    abar = ref_alphas_cumprod(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 16, 16, generator=g)
    c = torch.tensor([0, 2, 5, 9])
    x0 = ref_one_step(tiny_model, z, c, 440, abar, cond_scale=0.0)
    a = abar[440]
    x_t = (1 - a).sqrt() * z
    eps = tiny_model(x_t, torch.full((4,), 440.0), c, "test", cond_drop_prob=0.0, cond_scale=0.0)
    torch.testing.assert_close(x0, x_t / a.sqrt() - (1 / a - 1).sqrt() * eps)
    # equals init_sigma * (z - eps)
    torch.testing.assert_close(x0, (1 / a - 1).sqrt() * (z - eps), rtol=1e-5, atol=1e-5)
    # the call it makes
    rec = _Recorder(lambda x, t, c: torch.zeros_like(x))
    ref_one_step(rec, z, c, 440, abar, cond_scale=2.0)
    (call,) = rec.calls
    assert call["mode"] == "test" and call["cond_drop_prob"] == 0.0 and call["cond_scale"] == 2.0
    assert call["t"].dtype == torch.float32 and (call["t"] == 440.0).all()


def _oracle(x0_true, betas):
    """An eps-model that is exact for the single data point x0_true."""

    def fn(x, t, c):
        a = ref_compute_alpha(betas, t)
        return (x - a.sqrt() * x0_true) / (1 - a).sqrt()

    return fn


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_ddim_with_oracle_recovers_x0(eta, skip):
    betas = torch.from_numpy(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)).float()
    g = torch.Generator().manual_seed(0)
    x0_true = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    x = torch.randn(2, 3, 4, 4, generator=g)
    seq = ref_seq(skip, 20, 1000)
    rec = _Recorder(_oracle(x0_true, betas))
    out = ref_ddim(rec, x, torch.zeros(2, dtype=torch.long), seq, betas, eta=eta, cond_scale=2.0,
                   generator=g)
    torch.testing.assert_close(out, x0_true, rtol=1e-4, atol=1e-4)
    assert [int(cl["t"][0]) for cl in rec.calls] == seq[::-1]
    assert all(cl["mode"] == "test" and cl["cond_scale"] == 2.0 for cl in rec.calls)


def test_ddim_eta0_deterministic_and_eta1_uses_generator(tiny_model):
    betas = torch.from_numpy(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)).float()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([1, 7])
    seq = ref_seq("uniform", 5, 1000)
    a = ref_ddim(tiny_model, x, c, seq, betas, 0.0, 0.0, generator=torch.Generator().manual_seed(1))
    b = ref_ddim(tiny_model, x, c, seq, betas, 0.0, 0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a = ref_ddim(tiny_model, x, c, seq, betas, 1.0, 0.0, generator=torch.Generator().manual_seed(1))
    b = ref_ddim(tiny_model, x, c, seq, betas, 1.0, 0.0, generator=torch.Generator().manual_seed(1))
    d = ref_ddim(tiny_model, x, c, seq, betas, 1.0, 0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, d)


def test_ddim_single_step_by_hand():
    betas = torch.from_numpy(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)).float()
    abar = ref_alphas_cumprod(betas)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.full_like(x, 0.3)
    model = _Recorder(lambda x_, t, c: eps)
    seq = [0, 500]  # steps (500 -> 0), (0 -> -1)
    g = torch.Generator().manual_seed(5)
    out = ref_ddim(model, x, torch.zeros(1, dtype=torch.long), seq, betas, 1.0, 0.0, generator=g)
    g = torch.Generator().manual_seed(5)
    at, an = abar[500].double(), abar[0].double()
    xd = x.double()
    x0 = (xd - (1 - at).sqrt() * 0.3) / at.sqrt()
    c1 = ((1 - at / an) * (1 - an) / (1 - at)).sqrt()
    c2 = (1 - an - c1 ** 2).sqrt()
    x1 = an.sqrt() * x0 + c1 * torch.randn(x.shape, generator=g).double() + c2 * 0.3
    x0b = (x1 - (1 - an).sqrt() * 0.3) / an.sqrt()  # last step: at_next = 1 -> x = x0
    torch.testing.assert_close(out.double(), x0b, rtol=1e-5, atol=1e-5)


def test_ddpm_with_oracle_recovers_x0():
    betas = torch.from_numpy(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)).float()
    g = torch.Generator().manual_seed(0)
    x0_true = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    x = torch.randn(2, 3, 4, 4, generator=g)
    seq = ref_seq("uniform", 50, 1000)
    out = ref_ddpm(_Recorder(_oracle(x0_true, betas)), x, torch.zeros(2, dtype=torch.long), seq, betas,
                   cond_scale=0.0, generator=g)
    torch.testing.assert_close(out, x0_true, rtol=1e-4, atol=1e-4)


def test_ddpm_single_step_by_hand():
    betas = torch.from_numpy(ref_get_beta_schedule("linear", 1e-4, 0.02, 1000)).float()
    abar = ref_alphas_cumprod(betas).double()
    x = 3 * torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model = _Recorder(lambda x_, t, c: torch.full_like(x_, -0.2))
    seq = [0, 300, 700]
    out = ref_ddpm(model, x, torch.zeros(1, dtype=torch.long), seq, betas, 0.0,
                   generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    xd = x.double()
    for i, j in [(700, 300), (300, 0), (0, -1)]:
        at = abar[i]
        atm1 = abar[j] if j >= 0 else torch.tensor(1.0, dtype=torch.float64)
        bt = 1 - at / atm1
        x0 = ((1 / at).sqrt() * xd - (1 / at - 1).sqrt() * -0.2).clamp(-1, 1)
        mean = (atm1.sqrt() * bt * x0 + (1 - bt).sqrt() * (1 - atm1) * xd) / (1 - at)
        noise = torch.randn(x.shape, generator=g).double()
        xd = mean + (bt.sqrt() * noise if i != 0 else 0.0)
    torch.testing.assert_close(out.double(), xd, rtol=1e-4, atol=1e-4)
    assert [int(cl["t"][0]) for cl in model.calls] == [700, 300, 0]
