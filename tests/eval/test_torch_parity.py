"""Parity against PyTorch: our Flax FID Inception vs pytorch-fid's InceptionV3 (random weights, its download
patched out), the weight converter (every tensor, zip and legacy .pth), and the torchvision ResNet import."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import fake_torchvision  # noqa: E402

from sfd_jax.eval import inception as inc  # noqa: E402


def random_inception_state_dict(seed: int = 0) -> dict:
    """He-initialised convs and non-trivial BatchNorm statistics, so activations stay O(1) through the net."""
    g = torch.Generator().manual_seed(seed)
    sd = fake_torchvision.Inception3(num_classes=1008, aux_logits=False).state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if v.ndim == 4:
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / (v.shape[1] * v.shape[2] * v.shape[3])) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "running_mean", "fc.bias")):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) / 2048 ** 0.5
    return sd


@pytest.fixture(scope="module")
def fid_state_dict():
    return random_inception_state_dict()


@pytest.fixture(scope="module")
def pytorch_fid_net(fid_state_dict):
    pytest.importorskip("pytorch_fid")   # install with --no-deps: its torchvision import is served by the stand-in
    fake_torchvision.install()
    import pytorch_fid.inception as pfi
    sd = fid_state_dict
    orig = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: sd          # no download: random weights instead
    try:
        net = pfi.InceptionV3([3]).eval()
    finally:
        pfi.load_state_dict_from_url = orig
    yield net, sd
    fake_torchvision.uninstall()   # later modules (diffusers' availability checks) must not see the stand-in


def test_converter_maps_every_tensor_and_refuses_leftovers(fid_state_dict):
    sd = fid_state_dict
    np_sd = {k: v.numpy() for k, v in sd.items()}
    variables, ignored = inc.convert_fid_inception(np_sd)
    assert all(k.endswith("num_batches_tracked") for k in ignored)
    n_target = len(__import__("jax").tree_util.tree_leaves(inc.abstract_variables()))
    assert n_target == len(np_sd) - len(ignored)                 # one leaf per tensor, none left either side
    extra = dict(np_sd, **{"fc.extra": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="fc.extra"):
        inc.convert_fid_inception(extra)
    missing = {k: v for k, v in np_sd.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    with pytest.raises(ValueError, match="Mixed_7c/branch_pool/bn/var"):
        inc.convert_fid_inception(missing)


@pytest.mark.parametrize("legacy", [True, False])
def test_pool3_spatial_and_logits_match_pytorch_fid(pytorch_fid_net, tmp_path, legacy):
    net, sd = pytorch_fid_net
    path = str(tmp_path / inc.FID_WEIGHTS_NAME)
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    extractor = inc.InceptionExtractor.from_pth(path, batch_size=2)
    rng = np.random.default_rng(0)
    # upsampling (32 px), an odd size, and downsampling (320 px: no antialiasing in pytorch-fid either)
    for size in ((32, 32) if legacy else (17, 320)):
        imgs = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        spatial = {}
        hook = net.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
        with torch.no_grad():
            want = net(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0].numpy()
        hook.remove()
        got = extractor.features(imgs)
        assert np.abs(want).mean() > 0.1                         # not a vanishing-activation comparison
        np.testing.assert_allclose(got["pool3"], want, atol=1e-4, rtol=0)
        want_spatial = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
        # mid-network activations reach ~10: fp32 summation order differs, so a relative term too
        np.testing.assert_allclose(got["spatial"], want_spatial, atol=1e-4, rtol=3e-5)
        np.testing.assert_allclose(got["logits"], want @ sd["fc.weight"].numpy().T, atol=1e-4, rtol=1e-5)


def test_grayscale_images_are_repeated_to_rgb(fid_state_dict):
    sd = fid_state_dict
    variables, _ = inc.convert_fid_inception({k: v.numpy() for k, v in sd.items()})
    ex = inc.InceptionExtractor(variables, batch_size=1)
    g = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_allclose(ex.features(g)["pool3"], ex.features(np.repeat(g, 3, -1))["pool3"], atol=1e-6)


def test_resize_matches_torch_interpolate():
    x = np.random.default_rng(2).uniform(0, 255, (1, 13, 40, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0, size=(299, 299), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy() * 2 - 1
    np.testing.assert_allclose(np.asarray(inc.preprocess(x)), want, atol=5e-6)   # fp32 summation order


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inc.load_fid_inception_weights(str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------------------------------- torchvision ResNet
class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """torchvision.models.resnet18/34 (BasicBlock), written out: same names, same forward."""

    def __init__(self, blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, n in enumerate(blocks):
            cout = 64 * 2 ** i
            layer = [_Block(cin, cout, 2 if i and j == 0 else 1) if j == 0 else _Block(cout, cout, 1)
                     for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = cout
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean((2, 3)))


def test_torchvision_resnet_state_dict_imports_and_matches(tmp_path):
    from sfd_jax.eval.classifier_train import load_classifier, predict_logits

    torch.manual_seed(0)
    net = TorchResNet((2, 2, 2, 2), 10)
    for m in net.modules():                                       # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    path = str(tmp_path / "cifar10_resnet18.pth")
    torch.save(net.state_dict(), path)
    clf = load_classifier(path, image_size=32, input_size=64)
    assert clf.config.arch == "resnet18" and clf.config.n_classes == 10 and clf.config.stem == "imagenet"
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = net(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)).numpy()
    got = predict_logits(clf.config, clf.variables, imgs)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_fid_cli_end_to_end_sharded_over_2_devices(fid_state_dict, tmp_path):
    from PIL import Image

    from tests.conftest import run_cli

    sd = fid_state_dict
    weights = tmp_path / inc.FID_WEIGHTS_NAME
    torch.save(sd, str(weights), _use_new_zipfile_serialization=False)
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    imgs = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im[..., 0]).save(ref / f"{i % 3:03d}_{i:05d}.png")
    np.savez(tmp_path / "same.npz", images=imgs, labels=np.arange(12) % 3)
    out, cache = tmp_path / "fid.json", tmp_path / "cache"
    run_cli("sfd_jax.evaluate", "fid", f"--samples={tmp_path / 'same.npz'}", f"--ref={ref}",
            f"--inception={weights}",
            "--is", "--pr", "--fid_method=eigh", "--nosfid", f"--cache_dir={cache}", f"--out={out}", "--is_split_size=6", "--progress=false",
            devices=2, check=True)
    r = json.loads(out.read_text())
    assert r["n_samples"] == r["n_ref"] == 12
    # the same images on both sides. 2048-d statistics cost seconds each on 2 cores: the faster eigh method and
    # no sFID keep this short (sqrtm vs eigh: test_eval_metrics; spatial features: the parity test above)
    assert abs(r["fid"]) < 1e-2 and "sfid" not in r
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["inception_score"] >= 1.0
    assert len(list(cache.glob("ref_*.npz"))) == 1                  # reference statistics were cached
