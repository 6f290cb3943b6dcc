"""Bad input to the CLIs is refused up front with one line (``<prog>: error: ...``, exit 2, no traceback) and
nothing is written; --help exits 0; every ``python -m sfd_jax.X`` CLI is also ``sfd-jax X``."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from sfd_jax.cli_utils import UsageError, check_input_file, check_output_path
from tests.conftest import TEST_CONFIGS, ROOT, run_cli


def _refused(proc, prog: str, match: str):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error:") and match in lines[0], lines[0]


def _zip_pth(path, obj):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    return path


@pytest.fixture
def blocker(tmp_path):
    """A plain file: any output below it cannot be created."""
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


def _listing(root):
    return sorted(os.path.relpath(os.path.join(r, n), root) for r, ds, fs in os.walk(root) for n in ds + fs)


# ------------------------------------------------------------------------------------------------ helpers
def test_check_output_path_and_check_input_file(tmp_path, blocker):
    assert check_output_path(str(tmp_path / "new" / "deeper" / "x.json"), "--out")
    assert check_output_path(str(tmp_path / "new_dir"), "--out", directory=True)
    for path, directory, match in ((blocker / "x.json", False, "is a file, not a directory"),
                                   (blocker / "sub" / "x.npz", False, "is a file, not a directory"),
                                   (blocker, True, "exists and is not a directory"),
                                   (tmp_path, False, "is a directory; expected a file name")):
        with pytest.raises(UsageError, match=match):
            check_output_path(str(path), "--out", directory=directory)
    with pytest.raises(FileNotFoundError, match="--labels"):
        check_input_file(str(tmp_path / "nope.npy"), "--labels")
    with pytest.raises(UsageError, match="is a directory"):
        check_input_file(str(tmp_path), "--labels")
    assert _listing(tmp_path) == ["a_file"]      # nothing created


def test_prompt_folders_never_collide_with_the_index_file():
    from sfd_jax.eval.sd_prompts import prompt_folder, prompt_folders

    names = prompt_folders(["index.json", "INDEX.JSON", "", "Cat", "cat", "_"])
    assert all(n.casefold() != "index.json" for n in names) and "" not in names
    assert len({n.casefold() for n in names}) == len(names)
    assert prompt_folder("index.json").startswith("index.json_") and prompt_folder("") == "_"


# -------------------------------------------------------------------------------------------------- --help
def _cli_modules() -> set[str]:
    """Every sfd_jax module runnable as ``python -m``."""
    found = set()
    for dirpath, _, files in os.walk(ROOT / "sfd_jax"):
        for f in files:
            if not f.endswith(".py"):
                continue
            src = open(os.path.join(dirpath, f), encoding="utf-8").read()
            if re.search(r'^if __name__ == "__main__":', src, re.M):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                found.add(rel)
    return found


def test_every_cli_module_is_a_command_and_help_exits_0():
    from sfd_jax.cli import COMMANDS

    modules = _cli_modules()
    assert {"sfd_jax.sd.random_pipeline", "sfd_jax.sd.tokenizer", "sfd_jax.sd.memcheck"} <= modules
    assert modules == {m for m, _ in COMMANDS.values()}, "every python -m module is an sfd-jax command and back"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen([sys.executable, "-m", "sfd_jax", name, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for name in COMMANDS}
    procs["python -m sfd_jax.evaluate --helpshort"] = subprocess.Popen(
        [sys.executable, "-m", "sfd_jax.evaluate", "--helpshort"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=ROOT)
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name} --help exited {p.returncode}: {err[-2000:]}"
        assert "--" in out, f"{name} --help printed no flags"


# ------------------------------------------------------------------------------------------------ sample
def test_sample_refuses_bad_flags_labels_pth_and_outputs_up_front(tmp_path, blocker):
    np.save(tmp_path / "obj_labels.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "float_labels.npy", np.array([0.5, 1.0]))
    list_pth = _zip_pth(tmp_path / "list.pth", [1, 2, 3])
    dict_pth = _zip_pth(tmp_path / "dict.pth", {"a": 1, "b": "x"})
    nested_pth = _zip_pth(tmp_path / "nested.pth", [{"w": {"x": 1}}, None, 0, None])
    cfg = f"--config={TEST_CONFIGS / 'tiny_test.py'}"
    out = f"--out={tmp_path / 'o.npz'}"
    before = _listing(tmp_path)
    cases = [
        (["--batch=0", out], "--batch must be >= 1, got 0"),
        (["--batch=-5", out], "--batch must be >= 1, got -5"),
        (["--n_per_class=0", out], "--n_per_class must be >= 1"),
        (["--steps=0", out], "--steps must be >= 1"),
        ([f"--out={blocker / 'o.npz'}"], "is a file, not a directory"),
        ([f"--out={blocker / 'pngs'}"], "is a file, not a directory"),
        ([f"--out={blocker}"], "exists and is not a directory"),
        ([f"--labels={tmp_path / 'obj_labels.npy'}", out], "--labels"),
        ([f"--labels={tmp_path / 'float_labels.npy'}", out], "expected integer class labels"),
        ([f"--checkpoint={list_pth}", out], "expected a state dict, got int"),
        ([f"--checkpoint={dict_pth}", out], "entry 'a' is a int, not a numeric tensor"),
        ([f"--checkpoint={nested_pth}", out], "entry 'w' is a dict, not a numeric tensor"),
    ]
    for args, match in cases:
        ckpt = [] if any(a.startswith("--checkpoint") for a in args) else [f"--checkpoint={list_pth}"]
        _refused(run_cli("sfd_jax.sample", *ckpt, cfg, "--progress=false", *args), "sfd_jax.sample", match)
    assert _listing(tmp_path) == before


def test_sample_sd_and_convert_refuse_unwritable_out_and_bad_pth(tmp_path, blocker):
    list_pth = _zip_pth(tmp_path / "list.pth", [1, 2, 3])
    dict_pth = _zip_pth(tmp_path / "dict.pth", {"a": 1})
    before = _listing(tmp_path)
    sd = ["--model=/nonexistent", "--prompt=x"]
    _refused(run_cli("sfd_jax.sd.sample", *sd, f"--out={blocker / 'o'}"), "sfd_jax.sd.sample", "is a file")
    _refused(run_cli("sfd_jax.sd.sample", *sd, f"--out={tmp_path / 'o'}", "--batch=0"), "sfd_jax.sd.sample",
             "--batch must be >= 1")
    cfg = f"--config={TEST_CONFIGS / 'tiny_test.py'}"
    conv = "sfd_jax.convert"
    _refused(run_cli(conv, "ddpm", f"--src={list_pth}", cfg, f"--out={blocker / 'run'}"), conv, "is a file")
    _refused(run_cli(conv, "ddpm", f"--src={list_pth}", cfg, f"--out={tmp_path / 'run'}"), conv,
             "expected a state dict, got int")
    _refused(run_cli(conv, "ddpm", f"--src={dict_pth}", cfg, f"--out={tmp_path / 'run'}"), conv,
             "not a numeric tensor")
    _refused(run_cli(conv, "ddpm-to-pth", f"--checkpoint={tmp_path}", f"--out={blocker / 'x.pth'}"), conv,
             "is a file")
    _refused(run_cli(conv, "sid-lsg", f"--src={tmp_path / 'nope.pkl'}", f"--out={tmp_path / 'sid'}"), conv,
             "does not exist")
    assert _listing(tmp_path) == before


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_refuses_nan_images_bad_flags_and_outputs_up_front(tmp_path, blocker):
    nan = np.zeros((4, 8, 8, 1), np.float32)
    nan[2, 3, 3, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=nan, labels=np.arange(4))
    inf = np.zeros((4, 8, 8, 1), np.float32)
    inf[0, 0, 0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", images=inf, labels=np.arange(4))
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(4))
    np.savez(tmp_path / "objlabels.npz", images=np.zeros((2, 8, 8, 1), np.uint8),
             labels=np.array([0, None], dtype=object))
    (tmp_path / "clf").mkdir()
    (tmp_path / "w.pth").write_bytes(b"x")
    (tmp_path / "p.txt").write_text("index.json\n")
    before = _listing(tmp_path)
    ev = "sfd_jax.evaluate"
    fid = ["fid", f"--samples={tmp_path / 'ok.npz'}", f"--ref={tmp_path / 'ok.npz'}", f"--inception={tmp_path / 'w.pth'}"]
    forget = ["forgetting", f"--classifier={tmp_path / 'clf'}", "--forget=0"]
    cases = [
        (forget + [f"--samples={tmp_path / 'nan.npz'}"], "contain NaN or inf"),
        (forget + [f"--samples={tmp_path / 'inf.npz'}"], "contain NaN or inf"),
        (forget + [f"--samples={tmp_path / 'objlabels.npz'}"], "unreadable array"),
        (forget + [f"--samples={tmp_path / 'ok.npz'}", f"--out={blocker / 'ua.json'}"], "is a file"),
        (forget + [f"--samples={tmp_path / 'ok.npz'}", "--batch=0"], "--batch must be >= 1"),
        (fid + [f"--out={blocker / 'fid.json'}"], "is a file"),
        (fid + [f"--out={tmp_path}"], "is a directory"),
        (fid + ["--batch=-1"], "--batch must be >= 1"),
        (["train-classifier", "--dataset=digits", f"--out={blocker}"], "exists and is not a directory"),
        (["train-classifier", "--dataset=digits", f"--out={tmp_path / 'c'}", "--epochs=0"], "--epochs must be >= 1"),
        (["prompts", f"--checkpoint={tmp_path}", f"--prompts={tmp_path / 'p.txt'}", f"--outdir={blocker / 'o'}"],
         "is a file"),
        (["nudity", str(tmp_path), f"--out={blocker / 'n.json'}"], "is a file"),
    ]
    for args, match in cases:
        _refused(run_cli(ev, *args, "--progress=false"), ev, match)
    assert _listing(tmp_path) == before


def test_forgetting_refuses_a_generator_that_makes_nan_images(tmp_path):
    import jax

    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.ddpm.networks import load_network
    from tests.eval.test_cli import _digits_generator_checkpoint, _untrained_classifier

    clf = _untrained_classifier(tmp_path / "clf")
    net = load_network(_digits_generator_checkpoint(tmp_path / "run"), weights="ema")
    nan = jax.tree_util.tree_map(lambda a: np.full(np.shape(a), np.nan, np.float32), net.params)
    ckpt = Checkpointer(tmp_path / "nan_run" / "checkpoints")
    ckpt.save(0, {"generator": nan, "generator_ema": nan}, config=net.config)
    ckpt.wait()
    ckpt.close()
    proc = run_cli("sfd_jax.evaluate", "forgetting", f"--checkpoint={tmp_path / 'nan_run'}", f"--classifier={clf}",
                   "--n_per_class=1", "--forget=0", "--progress=false", f"--out={tmp_path / 'ua.json'}")
    _refused(proc, "sfd_jax.evaluate", "NaN/inf")
    assert not (tmp_path / "ua.json").exists()


def test_a_prompt_named_index_json_gets_its_own_folder(tmp_path):
    import json

    from sfd_jax.convert.sd_checkpoints import import_diffusers_unet
    from sfd_jax.sd.random_pipeline import write_random_pipeline

    pipe = str(tmp_path / "pipe")
    write_random_pipeline(pipe, "tiny")
    import_diffusers_unet(pipe, str(tmp_path / "run"))
    (tmp_path / "p.txt").write_text("index.json\nINDEX.JSON\n")
    out = tmp_path / "out"
    run_cli("sfd_jax.evaluate", "prompts", f"--checkpoint={tmp_path / 'run'}", f"--model={pipe}",
            f"--prompts={tmp_path / 'p.txt'}", "--seeds=0", f"--outdir={out}", "--progress=false", check=True)
    index = json.loads((out / "index.json").read_text())
    folders = [p["folder"] for p in index["prompts"]]
    assert len(folders) == 2 and all(f.casefold() != "index.json" for f in folders)
    assert all((out / f / "00000.png").is_file() for f in folders)
