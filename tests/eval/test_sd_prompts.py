"""``evaluate prompts`` (images per prompt and seed from a distilled SD generator) and ``evaluate nudity`` (NudeNet
counts): tiny random pipelines, real photos from scikit-learn, and one clear line for bad input."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from sfd_jax.cli_utils import UsageError
from sfd_jax.eval import nudity
from sfd_jax.eval.sd_prompts import MAX_NAME_BYTES, parse_seeds, prompt_folder, prompt_folders, read_prompts
from tests.conftest import last_line, run_cli

MOD = "sfd_jax.evaluate"
LONG = "a very long prompt " * 14  # 266 bytes
PROMPTS = ["a photo of a cat", "red/blue cube", "a photo of a cat", "", LONG, "  a dog  "]
UNIQUE = ["a photo of a cat", "red/blue cube", LONG.strip(), "a dog"]
SEEDS, SEED_LIST = "0-2,5", [0, 1, 2, 5]


def _fails_with(*args, match: str, devices=None):
    proc = run_cli(MOD, *args, devices=devices)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("sfd_jax.evaluate: error:") and match in line, proc.stderr[-2000:]
    return line


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _small_checkpoint(path, items):
    from sfd_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(path / "checkpoints")
    ckpt.save(0, items, meta={"note": "test"})
    ckpt.wait()
    ckpt.close()
    return str(path)


# ---------------------------------------------------------------------------------------- input parsing
def test_parse_seeds():
    assert parse_seeds("0-19,25") == list(range(20)) + [25]
    assert parse_seeds("3, 1-2, 3") == [3, 1, 2]
    assert parse_seeds("7") == [7]
    for bad in ("", "a", "1-x", "5-2", "-1", "0-2147483648", "1.5"):
        with pytest.raises(UsageError, match="--seeds"):
            parse_seeds(bad)


def test_prompts_are_read_in_order_without_blanks_or_duplicates(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("a dog\nzebra\n", encoding="utf-8")
    assert read_prompts([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == UNIQUE + ["zebra"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="holds no prompt"):
        read_prompts([str(tmp_path / "empty.txt")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts([str(tmp_path / "nope.txt")])


def test_prompt_folder_names():
    assert prompt_folder("Brad Pitt, smiling.") == "Brad Pitt, smiling."        # verbatim otherwise
    assert prompt_folder("red/blue\0cube") == "red_blue_cube"
    assert prompt_folder("..") == "__" and prompt_folder(".") == "_"
    long = "é" * 150                                                          # 300 bytes
    name = prompt_folder(long)
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert name.endswith("_" + hashlib.sha1(long.encode()).hexdigest()[:8]) and name.startswith("é" * 95)
    names = prompt_folders(["a/b", "a_b", "c"])
    assert names[0] == "a_b" and names[1].startswith("a_b_") and names[2] == "c" and len(set(names)) == 3


# ------------------------------------------------------------------------------------ prompts: bad input
def test_prompts_missing_prompt_file_and_bad_seeds_are_one_line_errors(tmp_path):
    ckpt = _small_checkpoint(tmp_path / "run", {"generator": {"w": np.zeros(2, np.float32)}})
    out = tmp_path / "out"
    _fails_with("prompts", f"--checkpoint={ckpt}", f"--prompts={tmp_path / 'nope.txt'}", f"--outdir={out}",
                match="prompt file")
    (tmp_path / "p.txt").write_text("a cat\n")
    _fails_with("prompts", f"--checkpoint={ckpt}", f"--prompts={tmp_path / 'p.txt'}", "--seeds=0-x",
                f"--outdir={out}", match="--seeds must look like")
    # A converted checkpoint stores no training config: the base pipeline must be named.
    _fails_with("prompts", f"--checkpoint={ckpt}", f"--prompts={tmp_path / 'p.txt'}", f"--outdir={out}",
                match="--model is required")
    _fails_with("prompts", f"--checkpoint={tmp_path / 'nothing'}", f"--prompts={tmp_path / 'p.txt'}",
                f"--outdir={out}", match="does not exist")
    assert not out.exists()


# -------------------------------------------------------------------------------- prompts: tiny pipeline
@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from sfd_jax.convert.sd_checkpoints import import_diffusers_unet
    from tests.sd_testutil import make_pipeline

    root = tmp_path_factory.mktemp("sdeval")
    pipe = str(root / "pipe")
    make_pipeline(pipe, "sd1")
    step_dir = import_diffusers_unet(pipe, str(root / "run"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return {"root": root, "pipe": pipe, "ckpt": str(root / "run"), "step_dir": step_dir, "prompts": str(prompts)}


def _prompts(sd_run, outdir, *extra, devices=None):
    return run_cli(MOD, "prompts", f"--checkpoint={sd_run['ckpt']}", f"--model={sd_run['pipe']}",
                   f"--prompts={sd_run['prompts']}", f"--seeds={SEEDS}", f"--outdir={outdir}", "--progress=false",
                   *extra, devices=devices, check=True)


def _images(outdir) -> dict:
    return {os.path.relpath(os.path.join(r, f), outdir): _png(os.path.join(r, f))
            for r, _, fs in os.walk(outdir) for f in fs if f.endswith(".png")}


@pytest.fixture(scope="module")
def batch3(sd_run):
    out = sd_run["root"] / "b3"
    proc = _prompts(sd_run, out, "--batch=3")
    return out, proc


@pytest.mark.torch
def test_prompts_layout_index_and_distinct_seeds(sd_run, batch3):
    out, proc = batch3
    assert "wrote 16 images, skipped 0" in proc.stdout
    folders = [prompt_folder(p) for p in UNIQUE]
    assert folders[1] == "red_blue cube" and len(folders[2].encode()) <= MAX_NAME_BYTES
    assert sorted(d for d in os.listdir(out) if os.path.isdir(out / d)) == sorted(folders)
    for f in folders:
        assert sorted(os.listdir(out / f)) == [f"{s:05d}.png" for s in SEED_LIST]
    imgs = _images(out)
    assert len(imgs) == 16 and all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for a in imgs.values())
    for f in folders:  # the noise differs per seed, so the images do
        a = [imgs[os.path.join(f, f"{s:05d}.png")] for s in SEED_LIST]
        assert all(not np.array_equal(a[i], a[j]) for i in range(4) for j in range(i + 1, 4))
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert [p["prompt"] for p in index["prompts"]] == UNIQUE and [p["folder"] for p in index["prompts"]] == folders
    assert index["seeds"] == SEED_LIST and index["step"] == 0 and index["init_timestep"] == 625
    assert index["checkpoint"] == os.path.abspath(sd_run["ckpt"]) and index["item"] == "generator"
    assert index["steps"] == 1 and index["resolution"] == 16


@pytest.mark.torch
def test_prompts_one_step_image_equals_a_direct_computation(sd_run, batch3):
    import jax
    import jax.numpy as jnp

    from sfd_jax.models.clip_text import text_embeddings
    from sfd_jax.models.vae import decode_latents
    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.generator import generate_latents
    from sfd_jax.sd.tokenizer import tokenize

    out, _ = batch3
    c = load_components(sd_run["pipe"])
    prompt, seed = "red/blue cube", 5
    emb = text_embeddings(c.text_encoder, c.text_encoder_params, jnp.asarray(tokenize(c.tokenizer, [prompt])))
    z = jax.random.normal(jax.random.key(seed), (8, 8, 4), jnp.float32)[None]
    lat = generate_latents(c.unet, c.unet_params, z, emb, c.schedule.alphas_cumprod, 625, 1)
    x = np.asarray(decode_latents(c.vae, c.vae_params, lat))[0]
    want = np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8)    # the original's truncating conversion
    got = _png(out / "red_blue cube" / "00005.png")
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.mean(got == want) > 0.99
    assert want.std() > 1  # not a constant image


@pytest.mark.torch
def test_prompts_images_do_not_depend_on_batch_or_device_count(sd_run, batch3):
    ref = _images(batch3[0])
    for name, extra, devices in (("b16", ("--batch=16",), None), ("d4", ("--batch=3",), 4)):
        out = sd_run["root"] / name
        _prompts(sd_run, out, *extra, devices=devices)
        got = _images(out)
        assert got.keys() == ref.keys()
        # The same noise and maths; XLA's rounding may differ with the batch shape, which can move a rare value
        # across the uint8 truncation boundary (one level).
        diff = np.stack([np.abs(got[k].astype(int) - ref[k].astype(int)) for k in ref])
        assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, (name, diff.max(), np.mean(diff == 0))


@pytest.mark.torch
def test_prompts_skip_existing_and_overwrite(sd_run):
    out = sd_run["root"] / "resume"
    _prompts(sd_run, out, "--batch=8", "--format=jpg")
    one, other = out / "a dog" / "00001.jpg", out / "a dog" / "00002.jpg"
    assert Image.open(one).format == "JPEG"
    os.remove(one)
    before = os.stat(other).st_mtime_ns
    proc = _prompts(sd_run, out, "--batch=8", "--format=jpg")
    assert "wrote 1 images, skipped 15" in proc.stdout and one.exists()
    assert os.stat(other).st_mtime_ns == before
    proc = _prompts(sd_run, out, "--batch=8", "--format=jpg", "--overwrite")
    assert "wrote 16 images, skipped 0" in proc.stdout
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]


@pytest.mark.torch
def test_prompts_checkpoint_errors(sd_run, tmp_path):
    base = ("prompts", f"--model={sd_run['pipe']}", f"--prompts={sd_run['prompts']}", f"--outdir={tmp_path / 'o'}")
    bad = _small_checkpoint(tmp_path / "bad", {"generator": {"w": np.zeros(2, np.float32)}})
    _fails_with(*base, f"--checkpoint={bad}", match="does not fit the base UNet config")
    nogen = _small_checkpoint(tmp_path / "nogen", {"fake_score": {"w": np.zeros(2, np.float32)}})
    _fails_with(*base, f"--checkpoint={nogen}", match="has no generator item")
    _fails_with(*base, f"--checkpoint={sd_run['ckpt']}", "--weights=raw", "--init_timestep=1000",
                match="--init_timestep must be in [0, 1000)")


# ------------------------------------------------------------------------------------------------ nudity
class FakeDetector:
    def __init__(self, table):
        self.table, self.calls = table, 0

    def detect(self, image):
        assert isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3
        self.calls += 1
        return self.table[int(image[0, 0, 0])]  # the image's first pixel selects its detections


def test_nudity_counting_with_a_fake_detector(tmp_path, monkeypatch):
    table = {
        0: [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]},   # == threshold: counted
            {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 1, 1]}],
        1: [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]},  # below: dropped
            {"class": "BELLY_COVERED", "score": 0.7, "box": [0, 0, 1, 1]}],
        2: [{"class": "ARMPITS_EXPOSED", "score": 0.61, "box": [0, 0, 1, 1]},
            {"class": "ANUS_EXPOSED", "score": 0.99, "box": [0, 0, 1, 1]}],
        3: [],
    }
    for k in table:
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / f"img{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    fake = FakeDetector(table)
    monkeypatch.setattr(nudity, "load_detector", lambda: fake)
    r = nudity.evaluate_folder(str(tmp_path), 0.6, progress=False)
    assert fake.calls == 4 and r["n_images"] == 4
    assert r["counts"]["FEMALE_BREAST_EXPOSED"] == 2 and r["counts"]["FACE_FEMALE"] == 1
    assert r["counts"]["MALE_GENITALIA_EXPOSED"] == 0 and r["counts"]["BELLY_COVERED"] == 1
    assert r["exposed"] == {"EXPOSED_ANUS": 1, "EXPOSED_ARMPITS": 1, "EXPOSED_BELLY": 0, "EXPOSED_BUTTOCKS": 0,
                            "EXPOSED_FEET": 0, "EXPOSED_BREAST_F": 2, "EXPOSED_GENITALIA_F": 0,
                            "EXPOSED_BREAST_M": 0, "EXPOSED_GENITALIA_M": 0}
    assert r["n_images_with_exposed"] == 2 and r["images_with_exposed"] == ["img0.png", "img2.png"]
    assert r["exposed_total"] == 4
    r = nudity.evaluate_folder(str(tmp_path), 0.5, progress=False)  # a lower threshold keeps the 0.59 box
    assert r["exposed"]["EXPOSED_GENITALIA_M"] == 1 and r["n_images_with_exposed"] == 3
    assert set(r["counts"]) == set(nudity.V3_LABELS)


def test_nudity_label_mapping():
    assert len(nudity.V3_LABELS) == 18 and len(set(nudity.V3_TO_V2.values())) == 16
    exposed_v3 = [label for label in nudity.V3_LABELS if label.endswith("_EXPOSED")]
    assert sorted(nudity.V3_TO_V2[label] for label in exposed_v3) == sorted(nudity.EXPOSED_V2)
    assert nudity.V3_TO_V2["FEMALE_BREAST_EXPOSED"] == "EXPOSED_BREAST_F"
    assert nudity.V3_TO_V2["MALE_GENITALIA_EXPOSED"] == "EXPOSED_GENITALIA_M"
    try:  # the installed package's own label list, when it is there
        from nudenet import nudenet as nn_mod
        assert tuple(getattr(nn_mod, "__labels")) == nudity.V3_LABELS
    except ImportError:
        pass


def test_nudity_without_nudenet_or_images_is_a_usage_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    import sys
    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(UsageError, match="pip install nudenet"):
        nudity.evaluate_folder(str(tmp_path), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .jpg/.jpeg/.png/.gif images"):
        nudity.evaluate_folder(str(tmp_path / "empty"), progress=False)
    _fails_with("nudity", str(tmp_path / "missing"), match="does not exist")
    _fails_with("nudity", str(tmp_path / "empty"), match="no .jpg/.jpeg/.png/.gif images")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    china, flower = load_sample_images().images
    Image.fromarray(china).save(folder / "china.png")
    Image.fromarray(flower).save(folder / "flower.jpg")
    return folder


def test_nudity_real_detector_on_landscape_photos(photos, tmp_path):
    pytest.importorskip("nudenet")
    r = nudity.evaluate_folder(str(photos), 0.6, progress=False)
    assert r["n_images"] == 2 and r["nudenet_version"]
    assert set(nudity.EXPOSED_V2) <= set(r["exposed"])
    assert all(isinstance(v, int) and v >= 0 for v in list(r["counts"].values()) + list(r["exposed"].values()))
    assert r["exposed"] == {k: 0 for k in nudity.EXPOSED_V2} and r["n_images_with_exposed"] == 0

    nested = tmp_path / "nested"
    (nested / "prompt a").mkdir(parents=True)
    os.link(photos / "china.png", nested / "prompt a" / "00000.png")
    out = tmp_path / "nudity.json"
    proc = run_cli(MOD, "nudity", str(nested), "--recursive", "--threshold=0.6", f"--out={out}",
                   "--progress=false", check=True)
    assert "EXPOSED_GENITALIA_F" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["n_images"] == 1 and rep["recursive"] and rep["threshold"] == 0.6
    assert rep["exposed"] == {k: 0 for k in nudity.EXPOSED_V2}


@pytest.mark.torch
def test_prompts_defaults_come_from_the_stored_training_config(sd_run, tmp_path):
    import ml_collections

    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.eval.sd_prompts import generate_prompt_images
    from sfd_jax.sd.pipeline import load_model

    _, params, _ = load_model(os.path.join(sd_run["pipe"], "unet"), "unet", put=np.asarray)
    cfg = ml_collections.ConfigDict({"sd": {"model": sd_run["pipe"]}, "distill": {"init_timestep": 500}})
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    ckpt.save(7, {"generator": params, "generator_ema": params}, config=cfg)
    ckpt.wait()
    ckpt.close()
    (tmp_path / "p.txt").write_text("a cat\n")
    common = dict(checkpoint=str(tmp_path / "run" / "checkpoints" / "7"), prompt_files=[str(tmp_path / "p.txt")],
                  seeds=[3], progress=False)
    r = generate_prompt_images(outdir=str(tmp_path / "ema"), **common)
    assert (r["item"], r["step"], r["init_timestep"], r["model"]) == ("generator_ema", 7, 500, sd_run["pipe"])
    assert r["written"] == 1 and (tmp_path / "ema" / "a cat" / "00003.png").is_file()
    r = generate_prompt_images(outdir=str(tmp_path / "raw"), weights="raw", steps=2, init_timestep=400, **common)
    assert (r["item"], r["init_timestep"], r["steps"]) == ("generator", 400, 2)
    assert not np.array_equal(_png(tmp_path / "ema" / "a cat" / "00003.png"),
                              _png(tmp_path / "raw" / "a cat" / "00003.png"))
