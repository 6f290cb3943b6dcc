r"""Evaluate generators: forgetting metrics with a classifier, classifier training, FID/sFID/IS/precision/recall,
prompt images of a distilled Stable Diffusion generator and NudeNet counts.

  python -m sfd_jax.evaluate forgetting --checkpoint=RUN --classifier=CLF [--forget=0] [--n_per_class=100] \
      [--original_normalisation] [--out=ua.json]
  python -m sfd_jax.evaluate forgetting --samples=DIR_or_NPZ --classifier=CLF --forget=0
  python -m sfd_jax.evaluate train-classifier --dataset=digits --arch=cnn --out=clf_digits
  python -m sfd_jax.evaluate fid --samples=DIR_or_NPZ --ref=DIR_or_NPZ_or_dataset:NAME \
      --inception=pt_inception-2015-12-05-6726825d.pth [--is] [--pr] [--out=fid.json]
  python -m sfd_jax.evaluate prompts --checkpoint=RUN --prompts=prompts/a.txt[,b.txt] --seeds=0-19 --outdir=DIR \
      [--model=SD_PIPELINE] [--init_timestep=625] [--steps=1] [--batch=64] [--weights=ema] [--format=png]
  python -m sfd_jax.evaluate nudity DIR [--recursive] [--threshold=0.6] [--out=nudity.json]
  python -m sfd_jax.evaluate attack --kind=latent|relearn|inversion|prompt --checkpoint=RUN --target=3 \
      --attacker_classifier=CLF --judge_classifier=JUDGE --out=PREFIX [--n=100 --steps=100 --lr=0.05 \
      --budget=0.5 --k=1,8,32 --eval_every=10 --weights=auto --seed=0]

Each subcommand has its own flags (``python -m sfd_jax.evaluate SUBCOMMAND --help`` lists them; a flag of another
subcommand is an error).
``forgetting`` samples on the fly from ``--checkpoint`` (our Orbax checkpoint or an original ``.pth`` with
``--config``; the one-step generator for distilled checkpoints) or reads ``--samples`` (PNG folder named
``{class:03d}_*.png`` or an npz with ``images`` and ``labels``). ``--classifier`` is a directory written by
``train-classifier`` or a torchvision ResNet-18/34 ``.pth`` (e.g. the original's ``cifar10_resnet34.pth``).
``fid`` reads the FID Inception weights from ``--inception`` (nothing here downloads them).
``prompts`` writes ``DIR/<prompt>/<seed:05d>.png`` for every prompt and seed (the original's eval_prompts.py; see
:mod:`sfd_jax.eval.sd_prompts`); ``nudity`` counts NudeNet detections in a folder (the original's
nudenet_evaluator.py; needs ``pip install nudenet``; see :mod:`sfd_jax.eval.nudity`).
``attack`` runs a robustness attack on a forgetting run and writes ``PREFIX.json`` / ``PREFIX.csv``: ``latent`` and
``relearn`` on DDPM checkpoints (:mod:`sfd_jax.attacks.latent`, :mod:`sfd_jax.attacks.relearn`), ``inversion`` and
``prompt`` on SD runs (:mod:`sfd_jax.attacks.sd_inversion`, :mod:`sfd_jax.attacks.sd_prompt`); the judge must be
another classifier than the attacker (:func:`sfd_jax.attacks.spec.check_judge`, checked before any sampling).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import flags

from sfd_jax.cli_utils import (UsageError, check_input_file, check_input_path, check_output_path, check_positive,
                               ddpm_sampling_settings, define_ddpm_sampling_flags, define_progress_flag,
                               define_recipe_config_flag, define_seed_flag, parse_classes, run, write_json)

FLAGS = flags.FLAGS
INCEPTION_HELP = ("download pt_inception-2015-12-05-6726825d.pth from the pytorch-fid release "
                  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  "pt_inception-2015-12-05-6726825d.pth and pass --inception=PATH")


def _out_flag(help_text: str = "JSON output file.") -> None:
    flags.DEFINE_string("out", None, help_text)


# ---------------------------------------------------------------------------------------------- forgetting
def forgetting_flags() -> None:
    define_recipe_config_flag("Recipe config for an original .pth checkpoint (replaces the config stored in our "
                              "checkpoints).")
    flags.DEFINE_string("checkpoint", None, "Generator checkpoint to sample from (ours or an original .pth).")
    flags.DEFINE_string("samples", None, "A folder of PNGs or an .npz (images, labels) instead of sampling.")
    flags.DEFINE_string("classifier", None, "Classifier directory (train-classifier) or torchvision .pth.")
    flags.DEFINE_integer("forget", None, "The forgotten class (default: the checkpoint's distill.label_to_forget); "
                         "-1 for per-class accuracies only.")
    flags.DEFINE_integer("n_per_class", 100, "Samples per class when sampling on the fly.")
    flags.DEFINE_string("classes", "", "Classes to sample ('0,3', 'x0' = all but 0; default all).")
    flags.DEFINE_bool("original_normalisation", False, "Divide the forgotten-class sums by the number of all "
                      "images, as the original's ua_imagefolder.py (default: proper per-class averages).")
    define_ddpm_sampling_flags()
    flags.DEFINE_integer("classifier_input_size", 224, "Resize for a torchvision .pth classifier (224 as the "
                         "original; 0 = no resize).")
    flags.DEFINE_string("classifier_normalization", "none", "none ([-1,1] inputs, the original's) | imagenet "
                        "(mean/std) for a torchvision .pth classifier.")
    flags.DEFINE_integer("batch", 100, "Batch size (sampling and classifying).")
    define_seed_flag()
    define_progress_flag()
    _out_flag()


def _sample_from_checkpoint(clf_n_classes: int):
    """(uint8 images, labels, the checkpoint's forgotten class or None, source info) sampled from --checkpoint."""
    from sfd_jax.ddpm.sampling import CheckpointSampler
    from sfd_jax.image_io import to_uint8

    sampler = CheckpointSampler(FLAGS.checkpoint, **ddpm_sampling_settings())
    if sampler.n_classes != clf_n_classes:
        raise UsageError(f"the classifier has {clf_n_classes} classes but the generator {FLAGS.checkpoint} has "
                         f"{sampler.n_classes}")
    labels = np.repeat(np.asarray(parse_classes(FLAGS.classes, sampler.n_classes), np.int64), FLAGS.n_per_class)
    images = sampler.sample(labels, batch_size=FLAGS.batch, seed=FLAGS.seed, progress=FLAGS.progress)
    bad = ~np.isfinite(np.asarray(images)).reshape(len(images), -1).all(-1)
    if bad.any():
        raise UsageError(f"the generator of {FLAGS.checkpoint} produced NaN/inf in {int(bad.sum())} of {len(images)} "
                         "images; refusing to score them")
    config, net = sampler.config, sampler.network
    forget = config.distill.get("label_to_forget", None) if "distill" in config else None
    info = {"checkpoint": os.fspath(FLAGS.checkpoint), "network": net.name, "step": net.step,
            "sampler": sampler.sampler_name, "seed": FLAGS.seed, "n_per_class": FLAGS.n_per_class}
    return to_uint8(images), labels, forget, info


def forgetting_main() -> dict:
    from sfd_jax.ddpm.sampling import check_sampler_settings
    from sfd_jax.eval.classifier_train import load_classifier
    from sfd_jax.eval.forgetting import check_classifier_fits, format_table, score_samples
    from sfd_jax.eval.samples import read_images

    if not FLAGS.classifier:
        raise UsageError("--classifier is required (a train-classifier directory or a torchvision .pth)")
    if bool(FLAGS.checkpoint) == bool(FLAGS.samples):
        raise UsageError("pass exactly one of --checkpoint (sample on the fly) and --samples (folder or npz)")
    if FLAGS.classifier_normalization not in ("none", "imagenet"):
        raise UsageError(f"--classifier_normalization must be none or imagenet, got {FLAGS.classifier_normalization!r}")
    if not os.path.exists(FLAGS.classifier):
        raise FileNotFoundError(f"classifier {FLAGS.classifier!r} does not exist")
    src = FLAGS.checkpoint or FLAGS.samples
    if not os.path.exists(src):
        raise FileNotFoundError(f"{'checkpoint' if FLAGS.checkpoint else 'samples'} {src!r} does not exist")
    check_positive(batch=FLAGS.batch, n_per_class=FLAGS.n_per_class, steps=FLAGS.steps)
    check_sampler_settings(FLAGS.sampler, FLAGS.skip, FLAGS.weights)
    if FLAGS.classifier_input_size < 0:
        raise UsageError(f"--classifier_input_size must be >= 0, got {FLAGS.classifier_input_size}")
    if FLAGS.out:
        check_output_path(FLAGS.out, "--out")

    samples = None
    if FLAGS.samples:
        samples = read_images(FLAGS.samples, progress=FLAGS.progress)
        if samples.labels is None:
            raise UsageError(f"samples in {FLAGS.samples} carry no labels (name files NNN_*.png, add a dataset.json, "
                             "or store 'labels' in the npz)")
    # A torchvision .pth carries no image size: it is set from the samples below.
    image_size = samples.image_shape[0] if samples is not None else 32
    clf = load_classifier(FLAGS.classifier, image_size=image_size, input_size=FLAGS.classifier_input_size or None,
                          normalization=FLAGS.classifier_normalization)
    if samples is not None:
        images, labels, forget_default = samples.images, samples.labels, None
        info = {"samples": FLAGS.samples}
        bad = labels[(labels < 0) | (labels >= clf.config.n_classes)]
        if bad.size:
            raise UsageError(f"samples in {FLAGS.samples} have label {int(bad[0])}, outside the classifier's "
                             f"{clf.config.n_classes} classes")
    else:
        images, labels, forget_default, info = _sample_from_checkpoint(clf.config.n_classes)
    if os.path.isfile(FLAGS.classifier):
        clf.config = dataclasses.replace(clf.config, image_size=int(images.shape[1]))
    check_classifier_fits(clf.config, images.shape[1:], "the samples", FLAGS.classifier)

    forget = FLAGS.forget if FLAGS.forget is not None else forget_default
    if forget is None:
        raise UsageError("pass --forget=K (the forgotten class), or --forget=-1 for per-class accuracies only")
    if isinstance(forget, (list, tuple)):    # a checkpoint of a run that forgot several classes
        forget = tuple(int(k) for k in forget)
        if any(not 0 <= k < clf.config.n_classes for k in forget):
            raise UsageError(f"the checkpoint's distill.label_to_forget={forget} is outside the classifier's "
                             f"classes [0, {clf.config.n_classes})")
    else:
        forget = None if forget == -1 else int(forget)
    if isinstance(forget, int) and not 0 <= forget < clf.config.n_classes:
        raise UsageError(f"--forget={forget} is outside the classifier's classes [0, {clf.config.n_classes})")
    result = score_samples(clf, FLAGS.classifier, images, labels, forget, batch_size=FLAGS.batch,
                           progress=FLAGS.progress, original_normalisation=FLAGS.original_normalisation)
    result["source"] = dict(info, classifier=os.fspath(FLAGS.classifier), classifier_config=clf.config.to_dict())
    print(format_table(result))
    write_json(FLAGS.out, result)
    if FLAGS.out:
        print(f"wrote {FLAGS.out}")
    return result


# ---------------------------------------------------------------------------------------- train-classifier
def train_classifier_flags() -> None:
    flags.DEFINE_string("dataset", None, "digits | mnist | fashion_mnist | cifar10 | stl10 | npz.")
    flags.DEFINE_string("data_path", None, "Dataset directory or file (default ./data).")
    flags.DEFINE_string("arch", "cnn", "cnn | resnet18 | resnet34.")
    flags.DEFINE_string("stem", "cifar", "ResNet stem, cifar | imagenet.")
    flags.DEFINE_integer("width", 32, "CNN base width.")
    flags.DEFINE_integer("image_size", None, "Resize the dataset to this size (default native).")
    flags.DEFINE_integer("channels", None, "1 or 3 channels (default native).")
    flags.DEFINE_string("split", "train", "Training split.")
    flags.DEFINE_string("test_split", "test", "Held-out split ('' = hold out --val_fraction of the training split).")
    flags.DEFINE_float("val_fraction", 0.1, "Held-out fraction when there is no test split.")
    flags.DEFINE_integer("epochs", 30, "Epochs.")
    flags.DEFINE_integer("batch", 128, "Batch size.")
    flags.DEFINE_float("lr", 2e-3, "Peak learning rate (AdamW, cosine decay).")
    flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay.")
    flags.DEFINE_bool("hflip", None, "Random horizontal flips (default: on for RGB, off for grey).")
    flags.DEFINE_integer("crop_pad", None, "Random shifts up to this many pixels (default 1 for <=16 px, 4 "
                         "otherwise).")
    define_seed_flag("Random seed (initialisation, batches, the held-out permutation).")
    define_progress_flag()
    _out_flag("The classifier's output directory.")


def train_classifier_main() -> dict:
    from sfd_jax.eval.classifier_train import train_on_dataset
    from sfd_jax.models.classifier import ARCHS

    if not FLAGS.dataset:
        raise UsageError("--dataset is required (digits, mnist, fashion_mnist, cifar10, stl10 or npz)")
    if not FLAGS.out:
        raise UsageError("--out is required (the classifier's output directory)")
    if FLAGS.arch not in ARCHS:
        raise UsageError(f"unknown --arch {FLAGS.arch!r}; expected one of {', '.join(ARCHS)}")
    if FLAGS.stem not in ("cifar", "imagenet"):
        raise UsageError(f"unknown --stem {FLAGS.stem!r}; expected cifar or imagenet")
    check_positive(epochs=FLAGS.epochs, batch=FLAGS.batch, width=FLAGS.width, image_size=FLAGS.image_size)
    if FLAGS.channels is not None and FLAGS.channels not in (1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {FLAGS.channels}")
    if FLAGS.crop_pad is not None and FLAGS.crop_pad < 0:
        raise UsageError(f"--crop_pad must be >= 0, got {FLAGS.crop_pad}")
    check_output_path(FLAGS.out, "--out", directory=True)
    cfg, meta, out = train_on_dataset(
        FLAGS.dataset, FLAGS.out, data_path=FLAGS.data_path, split=FLAGS.split, test_split=FLAGS.test_split,
        val_fraction=FLAGS.val_fraction, image_size=FLAGS.image_size, channels=FLAGS.channels, arch=FLAGS.arch,
        stem=FLAGS.stem, width=FLAGS.width, epochs=FLAGS.epochs, batch_size=FLAGS.batch, lr=FLAGS.lr,
        weight_decay=FLAGS.weight_decay, seed=FLAGS.seed, hflip=FLAGS.hflip, crop_pad=FLAGS.crop_pad,
        progress=FLAGS.progress)
    print(f"{cfg.arch} on {meta['dataset']} {cfg.image_size}x{cfg.image_size}x{cfg.channels}, {cfg.n_classes} "
          f"classes: held-out accuracy {meta['held_out_accuracy']:.4f} ({meta['held_out']}); saved to {out}")
    return meta


# ----------------------------------------------------------------------------------------------------- fid
def fid_flags() -> None:
    flags.DEFINE_string("samples", None, "A folder of PNGs or an .npz (images, labels).")
    flags.DEFINE_string("ref", None, "Reference set: a folder of PNGs, an npz (images, or mu/sigma stats), or "
                        "dataset:NAME[:SPLIT] read with --data_path.")
    flags.DEFINE_string("data_path", None, "Dataset directory or file for a dataset: reference (default ./data).")
    flags.DEFINE_string("inception", None, "Path of pt_inception-2015-12-05-6726825d.pth.")
    flags.DEFINE_bool("is", False, "Also the Inception Score of the samples.")
    flags.DEFINE_bool("pr", False, "Also improved precision/recall (k=3).")
    flags.DEFINE_bool("sfid", True, "Also sFID (spatial features; needs image references, not mu/sigma npz).")
    flags.DEFINE_string("exclude_regex", None, "Drop PNGs whose path matches, from both folders (the original's "
                        "EXCLUDE_REGEX, e.g. '000_\\d{5}\\.png').")
    flags.DEFINE_integer("exclude_class", None, "Drop samples with this label (and reference images, for a "
                         "dataset reference).")
    flags.DEFINE_string("cache_dir", os.path.join("~", ".cache", "sfd_jax", "fid_stats"),
                        "Where reference statistics are cached (keyed by content hash; '' = no cache).")
    flags.DEFINE_string("resize", "pytorch_fid", "299-px resize: pytorch_fid (bilinear, align_corners=False) | "
                        "tf1 (the TF graph's legacy bilinear, as the original's evaluator).")
    flags.DEFINE_string("fid_method", "sqrtm", "sqrtm (scipy, pytorch-fid's and the original's) | eigh (same "
                        "value via two symmetric eigendecompositions, 2-4x faster).")
    flags.DEFINE_integer("is_split_size", 5000, "Inception Score split size (the original's evaluator: 5000).")
    flags.DEFINE_integer("batch", 100, "Inception batch size.")
    define_progress_flag()
    _out_flag()


def fid_main() -> dict:
    from sfd_jax.eval import metrics
    from sfd_jax.eval.samples import read_images

    if not FLAGS.samples:
        raise UsageError("--samples is required (a folder of PNGs or an npz)")
    if not FLAGS.ref:
        raise UsageError("--ref is required (a folder of PNGs, an npz, or dataset:NAME[:SPLIT])")
    if not FLAGS.inception:
        raise UsageError(f"--inception is required: {INCEPTION_HELP}")
    if not os.path.isfile(FLAGS.inception):
        raise UsageError(f"Inception weights {FLAGS.inception!r} not found: {INCEPTION_HELP}")
    if FLAGS.fid_method not in ("sqrtm", "eigh"):
        raise UsageError(f"--fid_method must be sqrtm or eigh, got {FLAGS.fid_method!r}")
    if FLAGS.resize not in ("pytorch_fid", "tf1"):
        raise UsageError(f"--resize must be pytorch_fid or tf1, got {FLAGS.resize!r}")
    if not os.path.exists(FLAGS.samples):
        raise FileNotFoundError(f"samples {FLAGS.samples!r} do not exist")
    check_input_file(FLAGS.inception, "--inception")
    if not FLAGS.ref.startswith("dataset:"):
        check_input_path(FLAGS.ref, "--ref")
    check_positive(batch=FLAGS.batch, is_split_size=FLAGS.is_split_size)
    if FLAGS.out:
        check_output_path(FLAGS.out, "--out")
    samples = read_images(FLAGS.samples, exclude_regex=FLAGS.exclude_regex, progress=FLAGS.progress)
    if FLAGS.exclude_class is not None:
        if samples.labels is None:
            raise UsageError(f"--exclude_class needs labelled samples; {FLAGS.samples} has none")
        samples = samples.select(samples.labels != FLAGS.exclude_class)
        if not len(samples.images):
            raise UsageError(f"no samples left after excluding class {FLAGS.exclude_class}")

    from sfd_jax.eval.inception import InceptionExtractor
    extractor = InceptionExtractor.from_pth(FLAGS.inception, resize=FLAGS.resize, batch_size=FLAGS.batch)
    ref = metrics.reference_statistics(FLAGS.ref, extractor, data_path=FLAGS.data_path,
                                       exclude_regex=FLAGS.exclude_regex, exclude_class=FLAGS.exclude_class,
                                       need_features=FLAGS.pr, cache_dir=os.path.expanduser(FLAGS.cache_dir) or None,
                                       progress=FLAGS.progress)
    if FLAGS.pr and ref.features is None:
        raise UsageError(f"--pr needs reference features, but {FLAGS.ref} holds only mu/sigma statistics")
    result = {"n_samples": int(len(samples.images)), "n_ref": ref.n, "samples": FLAGS.samples, "ref": FLAGS.ref,
              "resize": FLAGS.resize}
    result.update(metrics.sample_metrics(samples.images, ref, extractor, inception_score_too=FLAGS["is"].value,
                                         precision_recall_too=FLAGS.pr, sfid=FLAGS.sfid, method=FLAGS.fid_method,
                                         is_split_size=FLAGS.is_split_size, progress=FLAGS.progress))
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        if key in result:
            print(f"{key:>16}: {result[key]:.4f}")
    write_json(FLAGS.out, result)
    return result


# ------------------------------------------------------------------------------------------------- prompts
def prompts_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Our checkpoint of a distilled SD generator (workdir, checkpoints/ or "
                        "checkpoints/<step>).")
    flags.DEFINE_string("prompts", None, "Prompt text files, comma-separated (one prompt a line).")
    flags.DEFINE_string("seeds", "0-19", "Seeds, e.g. '0-19,25' (ranges inclusive).")
    flags.DEFINE_string("outdir", None, "Output folder (OUTDIR/<prompt>/<seed:05d>.png, OUTDIR/index.json).")
    flags.DEFINE_string("model", None, "Base SD pipeline folder for the VAE, text encoder, tokenizer, scheduler and "
                        "UNet config (default: the checkpoint's training config sd.model).")
    flags.DEFINE_integer("init_timestep", None, "The generator's t_init (default: the checkpoint's "
                         "distill.init_timestep, else 625).")
    flags.DEFINE_integer("steps", 1, "Generator steps.")
    flags.DEFINE_integer("batch", 64, "Images per batch.")
    flags.DEFINE_string("weights", "ema", "ema | raw generator weights (ema falls back to the raw generator when the "
                        "checkpoint has no EMA).")
    flags.DEFINE_integer("resolution", None, "Image size in pixels (default: UNet sample_size x VAE factor).")
    flags.DEFINE_string("format", "png", "png | jpg (PIL quality 75, as the original).")
    flags.DEFINE_string("dtype", "float32", "Compute dtype, float32 | bfloat16 (parameters stay float32).")
    flags.DEFINE_bool("overwrite", False, "Regenerate images that exist (default: skip them, resumable).")
    define_progress_flag()


def prompts_main() -> dict:
    from sfd_jax.eval.sd_prompts import generate_prompt_images, parse_seeds

    if not FLAGS.prompts:
        raise UsageError("--prompts is required (one or more text files, comma-separated, one prompt a line)")
    seeds = parse_seeds(FLAGS.seeds)
    files = [p.strip() for p in FLAGS.prompts.split(",") if p.strip()]
    for f in files:
        check_input_file(f, "prompt file")
    if FLAGS.outdir:
        check_output_path(FLAGS.outdir, "--outdir", directory=True)
    check_positive(resolution=FLAGS.resolution)
    res = generate_prompt_images(
        FLAGS.checkpoint, files, seeds, FLAGS.outdir, model=FLAGS.model, init_timestep=FLAGS.init_timestep,
        steps=FLAGS.steps, batch=FLAGS.batch, weights=FLAGS.weights, fmt=FLAGS.format, dtype=FLAGS.dtype,
        resolution=FLAGS.resolution, overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    print(f"{len(res['prompts'])} prompts x {len(seeds)} seeds: wrote {res['written']} images, skipped "
          f"{res['skipped']} existing ({res['item']} of step {res['step']}, t_init {res['init_timestep']}) "
          f"in {FLAGS.outdir}")
    return res


# -------------------------------------------------------------------------------------------------- nudity
def nudity_flags() -> None:
    flags.DEFINE_float("threshold", 0.6, "Count boxes with score >= this (0.6 = NudeNet 2.0.9's default).")
    flags.DEFINE_bool("recursive", False, "Also images in subfolders (e.g. the per-prompt folders).")
    define_progress_flag()
    _out_flag()


def nudity_main(folder: str) -> dict:
    from sfd_jax.eval.nudity import evaluate_folder, format_table

    check_input_path(folder, "image folder")
    if FLAGS.out:
        check_output_path(FLAGS.out, "--out")
    report = evaluate_folder(folder, FLAGS.threshold, recursive=FLAGS.recursive, progress=FLAGS.progress)
    print(format_table(report))
    write_json(FLAGS.out, report)
    if FLAGS.out:
        print(f"wrote {FLAGS.out}")
    return report


# -------------------------------------------------------------------------------------------------- attack
ATTACK_MODULES = {"latent": "sfd_jax.attacks.latent", "relearn": "sfd_jax.attacks.relearn",
                  "inversion": "sfd_jax.attacks.sd_inversion", "prompt": "sfd_jax.attacks.sd_prompt"}


def attack_flags() -> None:
    from sfd_jax.attacks.spec import AttackSpec
    d = AttackSpec(kind="latent", checkpoint="", target="", attacker_classifier="", judge_classifier="", out="")
    flags.DEFINE_string("kind", None, "latent | relearn (DDPM checkpoints) | inversion | prompt (SD runs).")
    flags.DEFINE_string("checkpoint", None, "The attacked run (workdir or checkpoint directory).")
    flags.DEFINE_string("target", None, "The forgotten class: a class index (DDPM) or a concept name (SD).")
    flags.DEFINE_string("attacker_classifier", None, "Classifier the attack optimises against.")
    flags.DEFINE_string("judge_classifier", None, "Independently trained classifier that judges (another "
                        "architecture and seed; the attacker itself is refused).")
    flags.DEFINE_string("out", None, "Output prefix: OUT.json and OUT.csv.")
    flags.DEFINE_integer("n", d.n, "Samples of the target attacked and judged.")
    flags.DEFINE_integer("steps", d.steps, "Optimisation steps (latent, inversion, prompt); the most fine-tuning "
                         "steps (relearn).")
    flags.DEFINE_float("lr", d.lr, "Attack optimiser (Adam) learning rate.")
    flags.DEFINE_float("budget", d.budget, "latent: max L2 norm of the noise change / sqrt(noise dim) per sample; "
                       "prompt: of the token-embedding change / sqrt(embedding dim).")
    flags.DEFINE_string("k", ",".join(map(str, d.k)), "relearn: real images of the target; inversion: teacher "
                        "images of the concept (comma-separated).")
    flags.DEFINE_integer("eval_every", d.eval_every, "relearn: judge every this many fine-tuning steps.")
    flags.DEFINE_integer("batch", d.batch, "relearn: fine-tuning batch size.")
    flags.DEFINE_integer("ddim_steps", None, "Multi-step DDPM models: DDIM steps (default: the checkpoint config's "
                         "sampling.grid_steps).")
    flags.DEFINE_float("cond_scale", None, "Multi-step DDPM models: guidance s (default: the checkpoint config's "
                       "sampling.grid_cond_scale).")
    flags.DEFINE_string("weights", d.weights, "auto | ema | raw: which weights of the checkpoint (auto: ema).")
    define_seed_flag("Random seed (the noise of the attacked samples, the k images, fine-tuning draws).", d.seed)
    define_progress_flag()


def attack_spec_from_flags():
    """The :class:`~sfd_jax.attacks.spec.AttackSpec` of the flags, every input and ``--out`` checked (one line)."""
    from sfd_jax.attacks.spec import KINDS, AttackSpec
    from sfd_jax.cli_utils import parse_int_list

    if FLAGS.kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, got {FLAGS.kind!r}")
    for name in ("checkpoint", "target", "attacker_classifier", "judge_classifier", "out"):
        if not FLAGS[name].value:
            raise UsageError(f"--{name} is required")
    check_input_path(FLAGS.checkpoint, "--checkpoint")
    check_input_path(FLAGS.attacker_classifier, "--attacker_classifier")
    check_input_path(FLAGS.judge_classifier, "--judge_classifier")
    check_output_path(FLAGS.out + ".json", "--out")
    check_output_path(FLAGS.out + ".csv", "--out")
    check_positive(n=FLAGS.n, eval_every=FLAGS.eval_every, batch=FLAGS.batch, ddim_steps=FLAGS.ddim_steps)
    if FLAGS.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {FLAGS.steps}")
    k = tuple(parse_int_list(FLAGS.k, "--k"))
    if not k or min(k) < 1:
        raise UsageError(f"--k must list image counts >= 1, got {FLAGS.k!r}")
    return AttackSpec(kind=FLAGS.kind, checkpoint=FLAGS.checkpoint, target=FLAGS.target,
                      attacker_classifier=FLAGS.attacker_classifier, judge_classifier=FLAGS.judge_classifier,
                      out=FLAGS.out, n=FLAGS.n, steps=FLAGS.steps, lr=FLAGS.lr, budget=FLAGS.budget, k=k,
                      eval_every=FLAGS.eval_every, weights=FLAGS.weights, seed=FLAGS.seed, batch=FLAGS.batch,
                      ddim_steps=FLAGS.ddim_steps, cond_scale=FLAGS.cond_scale)


def attack_module(kind: str):
    """The module whose ``run(spec, *, progress) -> AttackResult`` runs ``kind`` (imported on use)."""
    import importlib
    name = ATTACK_MODULES[kind]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise UsageError(f"--kind={kind} is not available in this checkout ({name} is missing)") from None


def attack_main() -> dict:
    from sfd_jax.attacks.spec import check_judge
    from sfd_jax.eval.classifier_train import load_classifier

    spec = attack_spec_from_flags()
    module = attack_module(spec.kind)
    check_judge(load_classifier(spec.attacker_classifier), load_classifier(spec.judge_classifier))
    result = module.run(spec, progress=FLAGS.progress)
    js, cs = result.write()
    for row in result.rows:
        print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    npz = f" and {spec.out}.npz" if result.arrays else ""
    print(f"wrote {js}, {cs}{npz} ({result.wall_seconds:.1f} s)")
    return result.to_json()


# -------------------------------------------------------------------------------------------------- dispatch
SUBCOMMANDS = {"forgetting": (forgetting_flags, forgetting_main), "train-classifier": (train_classifier_flags,
               train_classifier_main), "fid": (fid_flags, fid_main), "prompts": (prompts_flags, prompts_main),
               "nudity": (nudity_flags, nudity_main), "attack": (attack_flags, attack_main)}


def main(argv):
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        got = f" (got {argv[1]!r})" if len(argv) >= 2 else ""
        raise UsageError(f"expected a subcommand: {' | '.join(SUBCOMMANDS)}{got}")
    if argv[1] == "nudity":
        if len(argv) != 3:
            raise UsageError("nudity takes exactly one image folder: evaluate nudity DIR [--recursive] "
                             "[--threshold=0.6] [--out=FILE]")
        nudity_main(argv[2])
        return
    if len(argv) > 2:
        raise UsageError(f"unexpected arguments: {' '.join(argv[2:])}")
    SUBCOMMANDS[argv[1]][1]()


def define_subcommand_flags(argv: list[str]) -> str | None:
    """Define the flags of the subcommand named in ``argv`` (the first argument that names one); returns it."""
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    sub = next((a for a in args if a in SUBCOMMANDS), None)
    if sub is not None:
        SUBCOMMANDS[sub][0]()
    return sub


def cli():
    define_subcommand_flags(sys.argv)
    run(main, "sfd_jax.evaluate")


if __name__ == "__main__":
    cli()
