"""Every entry point that reads a pickle goes through sfd_jax.safe_pickle.RestrictedUnpickler: a payload whose
``__reduce__`` would create a marker file is refused with a one-line error, and the marker never appears.

Entry points: torch_pickle.load_torch_file (zip .pth), the legacy .pth reader (inception.read_torch_state_dict;
payload in each record), the CIFAR-10 batch reader, the SiD-LSG import (plain pickle, zip, and inside a
storage's legacy bytes), and the CLIs reaching them (evaluate fid --inception, convert ddpm / sid-lsg,
evaluate train-classifier --dataset=cifar10).
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from sfd_jax.convert import torch_pickle as tp
from tests.conftest import TEST_CONFIGS, run_cli

MAGIC = 0x1950A86A20F9469CFC6C


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {"os.system": _Evil(os.system, (f"touch {marker}",)), "open": _Evil(open, (str(marker), "w"))}


@pytest.fixture(params=["os.system", "open"])
def evil(request, tmp_path):
    marker = tmp_path / "MARKER"
    return _payloads(marker)[request.param], marker


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


def _zip_pth(path, obj):
    """A torch zip checkpoint whose data.pkl is ``pickle.dumps(obj)`` (no torch needed)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def _legacy_records(record: str, payload) -> bytes:
    """A legacy torch.save file with ``payload`` in one record: first (a pickle that starts with the magic
    number, pops it and goes on), second (protocol), third (sys_info) or the object pickle."""
    magic = pickle.dumps(MAGIC, protocol=2)
    evil = pickle.dumps(payload, protocol=2)
    if record == "first":
        assert magic.startswith(tp._LEGACY_MAGIC)
        return magic[:-1] + b"0" + evil[2:]      # magic, POP, the payload's opcodes (no PROTO), STOP
    proto, info = pickle.dumps(1001, protocol=2), pickle.dumps({"little_endian": True}, protocol=2)
    body = {"second": [evil], "third": [proto, evil], "object": [proto, info, pickle.dumps({"w": payload}, 2)]}
    return magic + b"".join(body[record]) + pickle.dumps([], protocol=2)


# ------------------------------------------------------------------------------------------------- unit
def test_restricted_unpickler_refuses_every_other_global_and_persistent_ids(evil):
    from sfd_jax.safe_pickle import loads

    payload, marker = evil
    with pytest.raises(KeyError, match="global"):
        loads(pickle.dumps(payload), {}, KeyError)
    assert loads(pickle.dumps({"a": [1, "x"]}), {}, KeyError) == {"a": [1, "x"]}

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "pid" if obj == "ref" else None

    buf = io.BytesIO()
    P(buf).dump(["ref"])
    with pytest.raises(KeyError, match="persistent id"):
        loads(buf.getvalue(), {}, KeyError)
    assert loads(buf.getvalue(), {}, KeyError, persistent_load=lambda pid: 7) == [7]
    assert not marker.exists()


def test_zip_pth_payload_is_refused(evil, tmp_path):
    payload, marker = evil
    path = _zip_pth(tmp_path / "evil.pth", {"w": payload})
    with pytest.raises(tp.UnsafeCheckpointError) as ei:
        tp.load_torch_file(path)
    assert "refusing to load evil.pth" in _one_line(ei.value)
    assert not marker.exists()


@pytest.mark.parametrize("record", ["first", "second", "third", "object"])
def test_legacy_pth_payload_in_any_record_is_refused(evil, tmp_path, record):
    from sfd_jax.eval.inception import read_torch_state_dict

    payload, marker = evil
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_records(record, payload))
    assert tp.is_legacy_torch_file(path)
    with pytest.raises(tp.UnsafeCheckpointError) as ei:
        read_torch_state_dict(str(path))
    assert "refusing to load evil.pth" in _one_line(ei.value)
    assert not marker.exists()


def test_legacy_reader_still_reads_plain_records():
    assert tp.load_legacy_torch(_legacy_records("object", 3), "ok.pth") == {"w": 3}


def test_legacy_reader_reads_a_real_legacy_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    from sfd_jax.eval.inception import read_torch_state_dict

    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16),
          "c": torch.tensor(7, dtype=torch.int64)}
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    got = read_torch_state_dict(str(tmp_path / "old.pth"))
    assert set(got) == set(sd) and all(np.array_equal(got[k], sd[k].numpy()) for k in sd)


def test_cifar10_batch_payload_is_refused(evil, tmp_path):
    from sfd_jax.data.formats import DatasetError, read_cifar10

    payload, marker = evil
    root = tmp_path / "cifar"
    root.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        (root / name).write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0],
                                                "x": payload}, protocol=2))
    with pytest.raises(DatasetError) as ei:
        read_cifar10(root, "train")
    assert "refusing to unpickle global" in _one_line(ei.value)
    assert not marker.exists()


def _placeholder(*args):  # pickled by name only; _pickle_calling renames it
    raise AssertionError("never called")


def _pickle_calling(module: str, name: str, args: tuple, wrap=lambda x: x) -> bytes:
    """A protocol-2 pickle of ``wrap(<module.name(*args)>)``, written without importing ``module``."""
    data = pickle.dumps(wrap(_Evil(_placeholder, args)), protocol=2)
    here = f"{__name__}\n_placeholder\n".encode()
    assert here in data
    return data.replace(here, f"{module}\n{name}\n".encode())


def test_sid_lsg_payloads_are_refused_and_stub_classes_are_inert(evil, tmp_path):
    from sfd_jax.cli_utils import UsageError
    from sfd_jax.convert.sd_checkpoints import import_sid_lsg, read_sid_lsg_pickle

    payload, marker = evil
    out = tmp_path / "out"
    cases = {
        "top.pkl": pickle.dumps(payload),
        "ema.pkl": pickle.dumps({"ema": payload, "loss_fn": None}),
        "eval.pkl": pickle.dumps({"ema": _Evil(eval, (f"open({str(marker)!r}, 'w')",))}),
        # a storage record whose legacy torch.save bytes carry the payload
        "storage.pkl": _pickle_calling("torch.storage", "_load_from_bytes", (_legacy_records("object", payload),),
                                       wrap=lambda s: {"ema": s}),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(tp.UnsafeCheckpointError) as ei:
            import_sid_lsg(str(tmp_path / name), str(out), trust_pickle=True)
        assert "refusing to load" in _one_line(ei.value)
    # torch zip format with the payload in the module tree.
    _zip_pth(tmp_path / "evil.pt", {"ema": payload})
    with pytest.raises(tp.UnsafeCheckpointError):
        read_sid_lsg_pickle(str(tmp_path / "evil.pt"))
    # Names in the stub namespaces resolve to inert stubs: "calling" one records its arguments only.
    (tmp_path / "stub.pkl").write_bytes(_pickle_calling("diffusers.utils", "run_anything", (f"touch {marker}",),
                                                        wrap=lambda s: {"ema": s}))
    with pytest.raises(UsageError, match="not a diffusers UNet module"):
        read_sid_lsg_pickle(str(tmp_path / "stub.pkl"))
    assert not marker.exists() and not out.exists()


# -------------------------------------------------------------------------------------------------- CLIs
def _refused(proc, prog: str):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "refusing" in lines[0], lines[0]


def test_clis_refuse_payloads_and_never_run_them(tmp_path):
    marker = tmp_path / "MARKER"
    payload = _payloads(marker)["os.system"]
    imgs = tmp_path / "imgs.npz"
    np.savez(imgs, images=np.zeros((2, 8, 8, 3), np.uint8))
    files = {}
    for record in ("first", "second"):
        files[record] = tmp_path / f"legacy_{record}.pth"
        files[record].write_bytes(_legacy_records(record, payload))
    files["zip"] = _zip_pth(tmp_path / "evil_zip.pth", [{"w": payload}, None, 0, None])
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": payload}))
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (cifar / name).write_bytes(pickle.dumps({"data": payload, "labels": [0]}, protocol=2))

    for key in ("first", "second", "zip"):
        proc = run_cli("sfd_jax.evaluate", "fid", f"--samples={imgs}", f"--ref={imgs}",
                       f"--inception={files[key]}", f"--out={tmp_path / 'fid.json'}", "--progress=false")
        _refused(proc, "sfd_jax.evaluate")
    proc = run_cli("sfd_jax.convert", "ddpm", f"--src={files['zip']}", f"--config={TEST_CONFIGS / 'tiny_test.py'}",
                   f"--out={tmp_path / 'conv'}")
    _refused(proc, "sfd_jax.convert")
    proc = run_cli("sfd_jax.convert", "sid-lsg", f"--src={tmp_path / 'evil.pkl'}", f"--out={tmp_path / 'sid'}")
    _refused(proc, "sfd_jax.convert")
    proc = run_cli("sfd_jax.evaluate", "train-classifier", "--dataset=cifar10", f"--data_path={cifar}",
                   f"--out={tmp_path / 'clf'}", "--epochs=1", "--progress=false")
    _refused(proc, "sfd_jax.evaluate")
    assert not marker.exists()
    assert not any((tmp_path / n).exists() for n in ("fid.json", "conv", "sid", "clf"))
