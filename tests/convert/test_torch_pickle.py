"""Tests for sfd_jax.convert.torch_pickle: torch-free, code-free .pth reading and .pth writing."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from sfd_jax.convert.torch_pickle import (  # noqa: E402
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_torch_file,
    save_torch_file,
)

_NP_OF_TORCH = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}


def _tensor_bytes(t) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def assert_same(ours, ref, where="obj"):
    """Recursively compare a load_torch_file result with a torch object, tensors bitwise."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), f"{where}: {type(ours)} is not an ndarray"
        assert ours.dtype == _NP_OF_TORCH[ref.dtype], f"{where}: dtype {ours.dtype} vs {ref.dtype}"
        assert ours.shape == tuple(ref.shape), f"{where}: shape {ours.shape} vs {tuple(ref.shape)}"
        assert ours.flags.c_contiguous and ours.flags.owndata and ours.flags.writeable, where
        assert ours.tobytes() == _tensor_bytes(ref), f"{where}: values differ"
    elif isinstance(ref, dict):
        assert isinstance(ours, dict), f"{where}: {type(ours)} is not a dict"
        assert list(ours.keys()) == list(ref.keys()), f"{where}: keys/order differ"
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref), f"{where}: {type(ours)} vs {type(ref)}"
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, f"{where}: {ours!r} vs {ref!r}"


def assert_np_same(a, b, where="obj"):
    """Recursively compare two numpy-based structures, arrays bitwise (dtype and shape included)."""
    if isinstance(b, (np.ndarray, np.generic)):
        b = np.asarray(b)
        assert isinstance(a, np.ndarray), f"{where}: {type(a)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == np.ascontiguousarray(b).tobytes(), f"{where}: values differ"
    elif isinstance(b, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys/order differ"
        for k in b:
            assert_np_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_np_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def _roundtrip(obj, path):
    torch.save(obj, path)
    ours = load_torch_file(path)
    assert_same(ours, torch.load(path, weights_only=True))
    return ours


def _mixed_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(40, generator=g)
    return collections.OrderedDict(
        f32=torch.randn(4, 3, generator=g),
        f64=torch.randn(5, generator=g, dtype=torch.float64),
        f16=torch.randn(2, 3, generator=g).half(),
        bf16=torch.randn(3, 2, generator=g).bfloat16(),
        i64=torch.randint(-(2**40), 2**40, (6,), generator=g),
        i32=torch.randint(-1000, 1000, (2, 2), generator=g, dtype=torch.int32),
        i16=torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int16),
        i8=torch.randint(-100, 100, (3,), generator=g, dtype=torch.int8),
        u8=torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        mask=torch.rand(7, generator=g) > 0.5,
        scalar=torch.tensor(3.25),
        scalar_i=torch.tensor(7, dtype=torch.int64),
        empty=torch.zeros(0, 3),
        transposed=torch.randn(3, 5, generator=g).t(),
        permuted=torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        view_a=shared[2:8],
        view_b=shared[10:30].view(4, 5),
        view_c=shared[1::3],
        view_d=shared[5:25].view(4, 5)[:, 1:4].t(),
    )


def test_state_dict_dtypes_views_and_0d(tmp_path):
    sd = _mixed_state_dict()
    assert not sd["transposed"].is_contiguous() and sd["view_b"].storage_offset() == 10
    ours = _roundtrip(sd, tmp_path / "sd.pth")
    assert isinstance(ours, collections.OrderedDict)
    assert ours["scalar"].shape == () and ours["scalar"].item() == 3.25
    # arrays sharing one storage in the file are independent copies after loading
    ours["view_a"][:] = 0
    assert ours["view_b"].tobytes() == _tensor_bytes(sd["view_b"])


def test_nested_lists_optimizer_and_ema(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    ours = _roundtrip([model.state_dict(), opt.state_dict(), 1234, ema], tmp_path / "ckpt.pth")
    assert ours[2] == 1234
    assert ours[1]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert hasattr(ours[0], "_metadata")  # state_dict metadata survives like in torch

    sd, sd2 = _mixed_state_dict(1), _mixed_state_dict(2)
    _roundtrip([None, None, sd, None, 7, sd2], tmp_path / "sfd.pth")


def test_plain_containers(tmp_path):
    obj = {
        "set": {1, 2, 3},
        "frozen": frozenset({"a"}),
        "bytes": b"\x00\xffabc",
        "tuple": (1, 2.5, "x", None, True, False),
        "big": 2**70,
        "neg": -3,
        "nested": [[], {}, ()],
        3: "int key",
    }
    torch.save(obj, tmp_path / "c.pth")
    assert load_torch_file(tmp_path / "c.pth") == obj


def test_parameter_saved_directly(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 4))
    ours = _roundtrip(p, tmp_path / "param.pth")
    assert type(ours) is np.ndarray
    _roundtrip({"w": p, "b": torch.nn.Parameter(torch.zeros(2), requires_grad=False)}, tmp_path / "p2.pth")


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(sentinel):
    return {
        "os.system": (_Evil(os.system, (f"touch '{sentinel}'",)), "system"),
        "builtins.eval": (_Evil(eval, (f"open({str(sentinel)!r}, 'w').close()",)), "builtins.eval"),
        "subprocess.Popen": (_Evil(subprocess.Popen, (["touch", str(sentinel)],)), "subprocess.Popen"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload, expected = _payloads(sentinel)[kind]
    path = tmp_path / "ckpt.pth"
    torch.save({"w": torch.zeros(2), "evil": payload}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_file(path)
    msg = str(info.value)
    assert expected in msg and "ckpt.pth" in msg and "\n" not in msg
    time.sleep(0.2)
    assert not sentinel.exists()

    # control: the payload is real, an unrestricted unpickler does run it
    loaded = torch.load(path, weights_only=False)
    if isinstance(loaded["evil"], subprocess.Popen):
        loaded["evil"].wait()
    assert sentinel.exists()


def _write_torch_zip(path, pkl: bytes, storages: dict, byteorder: str | None = "little"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")


class _StorageRef:
    def __init__(self, key, numel, storage_type):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, ref, offset, size, stride):
        self.args = (ref, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def _crafted_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _RefPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_crafted_archive_matches_torch_and_oob_is_rejected(tmp_path):
    raw = np.arange(6, dtype=np.float32).tobytes()
    ref = _StorageRef("0", 6, torch.FloatStorage)
    ok = tmp_path / "ok.pth"
    _write_torch_zip(ok, _crafted_pickle({"t": _Tensor(ref, 1, (2, 2), (1, 2))}), {"0": raw})
    assert_same(load_torch_file(ok), torch.load(ok, weights_only=True))

    for size, stride, offset in [((3,), (3,), 1), ((7,), (1,), 0), ((2,), (-1,), 3), ((2,), (1,), 6)]:
        bad = tmp_path / "oob.pth"
        _write_torch_zip(bad, _crafted_pickle({"t": _Tensor(ref, offset, size, stride)}), {"0": raw})
        with pytest.raises(CheckpointFormatError, match="oob.pth"):
            load_torch_file(bad)

    short = tmp_path / "short.pth"
    _write_torch_zip(short, _crafted_pickle({"t": _Tensor(_StorageRef("0", 100, torch.FloatStorage), 0, (6,), (1,))}),
                     {"0": raw})
    with pytest.raises(CheckpointFormatError, match="short.pth"):
        load_torch_file(short)


def test_big_endian_byteorder(tmp_path):
    f = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    i = np.array([1, -(2**40), 7], dtype=np.int64)
    pkl = _crafted_pickle({
        "f": _Tensor(_StorageRef("0", 3, torch.FloatStorage), 0, (3,), (1,)),
        "i": _Tensor(_StorageRef("1", 3, torch.LongStorage), 1, (2,), (1,)),
    })
    path = tmp_path / "be.pth"
    _write_torch_zip(path, pkl, {"0": f.astype(">f4").tobytes(), "1": i.astype(">i8").tobytes()}, byteorder="big")
    out = load_torch_file(path)
    assert_np_same(out, {"f": f, "i": i[1:]})
    assert out["f"].dtype.isnative


def test_build_cannot_mutate_stand_ins(tmp_path):
    # GLOBAL torch._utils _rebuild_tensor_v2, then BUILD (None, {"fn": print}) via setattr.
    evil = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnN"
            b"s\x86b.")
    path = tmp_path / "build.pth"
    _write_torch_zip(path, evil, {})
    with pytest.raises(CheckpointFormatError, match="build.pth"):
        load_torch_file(path)
    _roundtrip(_mixed_state_dict(), tmp_path / "after.pth")  # still works


def test_stack_global_protocol4_is_checked(tmp_path):
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=4).dump(_Evil(os.system, ("true",)))
    path = tmp_path / "p4.pth"
    _write_torch_zip(path, buf.getvalue(), {})
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_file(path)


def test_bad_formats(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy.pth.*legacy"):
        load_torch_file(legacy)

    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointFormatError, match="random.pth"):
        load_torch_file(rnd)

    good = tmp_path / "good.pth"
    torch.save(_mixed_state_dict(), good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="trunc.pth"):
        load_torch_file(trunc)

    nopkl = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(nopkl, "w") as zf:
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointFormatError, match="nopkl.pth.*data.pkl"):
        load_torch_file(nopkl)

    badpkl = tmp_path / "badpkl.pth"
    _write_torch_zip(badpkl, b"\x80\x02}q\x00(X", {})
    with pytest.raises(CheckpointFormatError, match="badpkl.pth"):
        load_torch_file(badpkl)


def _numpy_tree():
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        z_last=rng.standard_normal((3, 4)).astype(np.float32),
        a_f16=rng.standard_normal(5).astype(np.float16),
        bf16=rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        f64=rng.standard_normal(2),
        i64=np.array([1, -(2**40)], dtype=np.int64),
        i32=np.array([[3]], dtype=np.int32),
        u8=np.arange(5, dtype=np.uint8),
        mask=np.array([True, False, True]),
        zero_d=np.array(2.5, dtype=np.float32),
        np_scalar=np.float32(1.25),
        transposed=rng.standard_normal((3, 5)).astype(np.float32).T,
        readonly=np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), dtype=np.float32),
        nested={"list": [np.ones(2, np.float32), 3, "s"], "tuple": (np.zeros((1, 2), np.int64), None)},
        step=7,
    )


def test_save_roundtrips(tmp_path):
    tree = _numpy_tree()
    path = tmp_path / "saved.pth"
    save_torch_file(tree, path)

    ref = torch.load(path, weights_only=True)
    assert list(ref.keys()) == list(tree.keys())
    assert ref["bf16"].dtype == torch.bfloat16 and ref["np_scalar"].shape == ()
    for k in ("z_last", "a_f16", "bf16", "f64", "i64", "transposed", "mask", "zero_d"):
        assert _tensor_bytes(ref[k]) == np.ascontiguousarray(tree[k]).tobytes(), k
        assert tuple(ref[k].shape) == tree[k].shape and _NP_OF_TORCH[ref[k].dtype] == tree[k].dtype, k

    assert_np_same(load_torch_file(path), tree)


def test_save_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3, dtype=jnp.bfloat16), "s": jnp.int32(4)}
    path = tmp_path / "jax.pth"
    save_torch_file(tree, path)
    assert_np_same(load_torch_file(path), {k: np.asarray(v) for k, v in tree.items()})
    assert torch.load(path, weights_only=True)["b"].dtype == torch.bfloat16


def test_save_without_torch_raises_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        save_torch_file({"w": np.zeros(2)}, tmp_path / "x.pth")


def test_load_works_without_torch(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save({"w": torch.arange(6.0).view(2, 3).t(), "n": 3}, path)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from sfd_jax.convert.torch_pickle import load_torch_file\n"
        f"d = load_torch_file({str(path)!r})\n"
        "assert d['w'].tolist() == [[0, 3], [1, 4], [2, 5]] and d['n'] == 3\n"
        "assert sys.modules['torch'] is None\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
