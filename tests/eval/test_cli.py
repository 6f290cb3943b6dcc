"""``python -m sfd_jax.evaluate``: train-classifier and forgetting end to end, and one clear line for bad input."""
from __future__ import annotations

import json

import jax
import numpy as np

from sfd_jax.eval.classifier_train import save_classifier
from sfd_jax.models.classifier import ClassifierConfig, init_variables
from tests.conftest import last_line, run_cli

MOD = "sfd_jax.evaluate"


def _untrained_classifier(path, n_classes=10, image_size=8, channels=1):
    cfg = ClassifierConfig(arch="cnn", n_classes=n_classes, image_size=image_size, channels=channels, width=8)
    save_classifier(path, init_variables(cfg, jax.random.key(0)), cfg, {"note": "untrained"})
    return str(path)


def _digits_generator_checkpoint(path):
    """A freshly initialised 8x8x1 one-step generator, saved as a distilled checkpoint (forget class 2)."""
    from sfd_jax.checkpoint import Checkpointer
    from sfd_jax.ddpm.config import distill_config
    from sfd_jax.models.ddpm_unet import ConditionalUNet

    cfg = distill_config(sg_lr=3e-5, sg_forget_coef=0.01, g_forget_coef=0.01, label_to_forget=2, dataset="digits",
                         image_size=8, ch_mult=(1, 2))
    cfg.model.ch, cfg.model.num_res_blocks, cfg.model.attn_resolutions = 32, 1, (4,)
    cfg.model.in_channels = cfg.model.out_ch = cfg.data.channels = 1
    params = ConditionalUNet.from_config(cfg).init_params(jax.random.key(0))
    ckpt = Checkpointer(path / "checkpoints")
    ckpt.save(0, {"generator": params, "generator_ema": params}, config=cfg)
    ckpt.wait()
    return str(path)


def test_train_classifier_then_forgetting_on_a_sample_npz(tmp_path):
    out = tmp_path / "clf"
    proc = run_cli(MOD, "train-classifier", "--dataset=digits", "--arch=cnn", f"--out={out}", "--epochs=3",
                   "--progress=false", check=True)
    assert "held-out accuracy" in proc.stdout
    info = json.loads((out / "classifier.json").read_text())
    assert info["config"]["image_size"] == 8 and info["config"]["channels"] == 1
    assert info["config"]["n_classes"] == 10 and info["config"]["arch"] == "cnn"
    assert info["meta"]["held_out_accuracy"] > 0.5 and info["meta"]["n_held_out"] == 360

    from sfd_jax.data import load_dataset
    test = load_dataset("digits", split="test")
    np.savez(tmp_path / "s.npz", images=test.images, labels=test.labels)
    res = tmp_path / "ua.json"
    run_cli(MOD, "forgetting", f"--samples={tmp_path / 's.npz'}", f"--classifier={out}", "--forget=3",
            f"--out={res}", "--progress=false", check=True)
    r = json.loads(res.read_text())
    assert r["forget_class"] == 3 and r["n_images"] == len(test.images)
    assert set(r["per_class"]) == {str(c) for c in range(10)}
    assert r["forgotten"]["normalisation"] == "per_class" and r["forgotten"]["n"] == int((test.labels == 3).sum())


def test_forgetting_samples_the_generator_on_the_fly_sharded_over_4_devices(tmp_path):
    ckpt = _digits_generator_checkpoint(tmp_path / "run")
    clf = _untrained_classifier(tmp_path / "clf")
    res = tmp_path / "ua.json"
    run_cli(MOD, "forgetting", f"--checkpoint={ckpt}", f"--classifier={clf}", "--n_per_class=3",
            "--original_normalisation", f"--out={res}", "--progress=false", devices=4, check=True)
    r = json.loads(res.read_text())
    assert r["forget_class"] == 2                       # from the checkpoint's distill.label_to_forget
    assert r["n_images"] == 30 and r["forgotten"]["normalisation"] == "all_images"
    assert r["source"]["sampler"] == "one_step" and r["source"]["network"] == "generator_ema"


def _fails_with(*args, match: str):
    proc = run_cli(MOD, *args)
    assert proc.returncode != 0
    line = last_line(proc.stderr)
    assert line.startswith("sfd_jax.evaluate: error:") and match in line, proc.stderr[-2000:]
    return line


def test_bad_input_gives_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "s16.npz", images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.arange(4))
    np.savez(tmp_path / "s8.npz", images=np.zeros((10, 8, 8, 1), np.uint8), labels=np.arange(10))
    clf10 = _untrained_classifier(tmp_path / "clf10")
    clf5 = _untrained_classifier(tmp_path / "clf5", n_classes=5)
    _fails_with("fid", f"--samples={tmp_path / 's8.npz'}", f"--ref={tmp_path / 's8.npz'}",
                f"--inception={tmp_path / 'missing.pth'}", match="pt_inception-2015-12-05-6726825d.pth")
    _fails_with("fid", f"--samples={tmp_path / 's8.npz'}", f"--ref={tmp_path / 's8.npz'}",
                match="--inception is required")
    (tmp_path / "dummy.pth").write_bytes(b"x")
    _fails_with("fid", f"--samples={tmp_path / 'empty'}", f"--ref={tmp_path / 's8.npz'}",
                f"--inception={tmp_path / 'dummy.pth'}", match="no PNG images")
    _fails_with("forgetting", f"--samples={tmp_path / 'empty'}", f"--classifier={clf10}", "--forget=0",
                match="no PNG images")
    _fails_with("forgetting", f"--samples={tmp_path / 's16.npz'}", f"--classifier={clf10}", "--forget=0",
                match="trained on 8x8 images but the samples are 16x16")
    _fails_with("forgetting", f"--samples={tmp_path / 's8.npz'}", f"--classifier={clf5}", "--forget=0",
                match="outside the classifier's 5 classes")
    ckpt = _digits_generator_checkpoint(tmp_path / "run")
    _fails_with("forgetting", f"--checkpoint={ckpt}", f"--classifier={clf5}", match="has 10")
    _fails_with("forgetting", f"--samples={tmp_path / 's8.npz'}", f"--classifier={ckpt}", "--forget=0",
                match="not a classifier checkpoint")
    _fails_with("bogus", match="expected a subcommand")


def test_each_subcommand_has_its_own_flags():
    """``--steps``/``--batch`` mean one thing per subcommand; a flag of another subcommand is refused."""
    prompts = run_cli(MOD, "prompts", "--helpshort")
    assert prompts.returncode == 0
    flags = {ln.split(":")[0].strip() for ln in prompts.stdout.splitlines() if ln.startswith("  --")}
    assert {"--steps", "--batch", "--prompts"} <= flags and "--classifier" not in flags
    assert "(default: '1')" in prompts.stdout.split("--steps:")[1].split("--")[0]
    _fails_with("fid", "--classifier=x", match="Unknown command line flag 'classifier'")
