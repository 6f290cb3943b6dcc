r"""The Stable Diffusion demo: a text-to-image world trained here, its one-step student, SFD forgetting one concept,
judged by a classifier (``python -m sfd_jax.demo --task=sd``).

  python -m sfd_jax.demo --task=sd [--data=digits|fashion_mnist|NPZ --class_names=FILE --templates=FILE]
      [--forget=NAME --override=NAME] [--workdir=demo_sd]

Stages (each reused when its outputs are in ``--workdir`` with the same settings; training resumes):

  1. world       the VAE trained on the images and a frozen random CLIP text encoder with the real tokenizer
                 (:mod:`sfd_jax.sd.world`) -> ``WORKDIR/world_base`` (+ ``world.json``: reconstruction error,
                 prompt separability)
  2. teacher     ``mode='sd_pretrain'`` (``configs/sd_world_pretrain.py``) -> ``WORKDIR/teacher``, exported with
                 the trained EMA UNet as the diffusers pipeline ``WORKDIR/world``
  3. classifier  the evaluation CNN on the images' train split (held-out accuracy on the rest), in a thread
  4. student     SiD-LSG: SD SFD with forgetting off (``configs/sd_world.py:student``) -> ``WORKDIR/student``
  5. forget      SFD from the student (``configs/sd_world.py:forget``): forget = captions of --forget, override
                 = the same captions of --override, remain = captions of the other classes
                 -> ``WORKDIR/forget_<forget>_to_<override>`` (another pair reuses stages 1-4); several
                 concepts at once (``--forget=zero,seven --override=one,one``): a forget table
                 ``WORKDIR/prompts/forget_<run>.csv`` (``prompts.forget_table``), remain = the captions of the
                 classes not forgotten -> ``WORKDIR/forget_zero-seven_to_one-one``
  6. samples     ``samples_{teacher,student,generator}.npz`` (``images`` uint8 NHWC at the data's resolution,
                 ``labels`` = class of the prompt's concept, ``n_per_class`` per concept, prompts = the templates
                 cycled), ``grid_{real,teacher,student,generator}.png`` (one row per concept), ``report.md``,
                 ``report.json``. A several-concept run writes its own ``samples_generator_<run>.npz``,
                 ``grid_generator_<run>.png`` and ``report_<run>.{json,md}`` (teacher and student samples shared).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time

import numpy as np

from sfd_jax.cli_utils import UsageError
from sfd_jax.demo_stages import BackgroundStage, StageLog, banner
from sfd_jax.sd.demo_report import (build_multi_report, build_report, multi_report_markdown, recognition,
                                    report_markdown, save_concept_grid)

@dataclasses.dataclass(frozen=True)
class SDDemoSettings:
    n_per_class: int = 100
    grid_per_class: int = 10
    sample_seed: int = 2024
    teacher_steps: int = 20          # DDIM steps of the teacher samples
    teacher_guidance: float = 3.0    # w of the teacher samples (the recipes' κ)
    vae_steps: int = 500
    teacher_iters: int = 1500
    teacher_batch: int = 64
    student_kimg: float = 4.8
    forget_kimg: float = 3.2
    sfd_batch: int = 16
    classifier_epochs: int = 40
    fast: bool = False


FAST = SDDemoSettings(n_per_class=4, grid_per_class=4, teacher_steps=2, vae_steps=5, teacher_iters=2,
                      teacher_batch=8, student_kimg=0.004, forget_kimg=0.004, sfd_batch=2, classifier_epochs=1,
                      fast=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "concept"


def write_prompt_files(folder: str, data, forget: int) -> dict[str, str]:
    """``all.txt`` (every class's captions), ``<forget>.txt`` (the forget class's) and ``remain.txt`` (the
    other classes') under ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    files = {"all": [c for k in range(data.n_classes) for c in data.all_captions(k)],
             "forget": data.all_captions(forget),
             "remain": [c for k in range(data.n_classes) if k != forget for c in data.all_captions(k)]}
    paths = {}
    for key, lines in files.items():
        name = f"{_slug(data.class_names[forget])}.txt" if key == "forget" else f"{key}.txt"
        paths[key] = os.path.join(folder, name)
        with open(paths[key], "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def write_table_files(folder: str, data, forget: tuple[int, ...], override: tuple[int, ...], run: str) -> dict:
    """Prompt files of a several-concept run under ``folder``: ``<concept>.txt`` per forgotten class (its
    captions), ``remain_<run>.txt`` (the captions of the classes not forgotten) and the forget table
    ``forget_<run>.csv`` (concept = the class name as a literal regex, override = the override class's name,
    forget_prompts = the concept's file); returns {"remain": path, "table": path}."""
    import csv
    os.makedirs(folder, exist_ok=True)
    rows = []
    for k, o in zip(forget, override):
        name = f"{_slug(data.class_names[k])}.txt"
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(data.all_captions(k)) + "\n")
        rows.append([re.escape(data.class_names[k]), data.class_names[o], name])
    remain = os.path.join(folder, f"remain_{run}.txt")
    with open(remain, "w") as f:
        f.write("\n".join(c for k in range(data.n_classes) if k not in forget for c in data.all_captions(k)) + "\n")
    table = os.path.join(folder, f"forget_{run}.csv")
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concept", "override", "forget_prompts"])
        w.writerows(rows)
    return {"remain": remain, "table": table}


def stage_key(config) -> dict:
    """A training stage's key in ``demo_state.json``: its config, less an empty ``prompts.forget_table`` (the key
    came with several-concept runs; single-concept stages recorded before it are still reused)."""
    from sfd_jax.demo_stages import plain
    key = plain(config)
    if "prompts" in key and not key["prompts"].get("forget_table", None):
        key["prompts"].pop("forget_table", None)
    return key


# ------------------------------------------------------------------------------------------------- stages
def _recipe(name: str, variant: str | None = None):
    import importlib.util

    from sfd_jax.ddpm.demo import configs_dir
    spec = importlib.util.spec_from_file_location(f"sfd_jax_sd_demo_{name}", configs_dir() / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def teacher_config(base: str, data_spec: dict, s: SDDemoSettings):
    c = _recipe("sd_world_pretrain")
    c.sd.model = base
    c.data.dataset, c.data.class_names, c.data.templates = data_spec["data"], data_spec["class_names"], \
        data_spec["templates"]
    c.training.n_iters, c.training.batch = s.teacher_iters, s.teacher_batch
    c.training.snapshot_freq = s.teacher_iters
    c.training.log_freq = min(c.training.log_freq, s.teacher_iters)
    if s.fast:
        c.training.grid_per_class, c.training.grid_steps = 1, 2
    return c


def sfd_config(variant: str, world: str, prompts: dict, data, forget: int, override: int, s: SDDemoSettings,
               generator_init: str = ""):
    c = _recipe("sd_world", variant)
    c.sd.model, c.sd.generator_init = world, generator_init
    c.sd.resolution = int(data.dataset.image_shape[0])
    if variant == "student":   # forgetting off: the forget prompts are never used (the first class's, fixed)
        c.prompts.remain = c.prompts.forget = prompts["all"]
        forget, override = 0, 1
    else:
        c.prompts.remain, c.prompts.forget = prompts["remain"], prompts["forget"]
    c.prompts.concept_to_forget = re.escape(data.class_names[forget])
    c.prompts.concept_to_override = data.class_names[override]
    c.training.batch = s.sfd_batch
    c.training.duration_kimg = s.student_kimg if variant == "student" else s.forget_kimg
    c.training.tick_kimg = c.training.duration_kimg
    if s.fast:
        c.training.grid_items = 2
    return c


def train_stage(name: str, trainer_cls, config, workdir: str, total: int, log) -> None:
    """Run, resume or reuse a training run of ``config`` in ``workdir`` (``total`` = its number of steps)."""
    from sfd_jax.demo_stages import train_stage as run_stage
    run_stage(name, lambda: trainer_cls(config, workdir).run(), stage_key(config), workdir, log, total=total)


def classifier_stage(out_dir: str, data, held_out, s: SDDemoSettings, log, stop=None):
    """The evaluation CNN on ``data``'s images (held-out accuracy on ``held_out``)."""
    from sfd_jax.eval.classifier_train import TrainConfig, load_classifier, save_classifier, train_classifier
    from sfd_jax.models.classifier import ClassifierConfig
    h, _, ch = data.dataset.image_shape
    cfg = ClassifierConfig(arch="cnn", n_classes=data.n_classes, image_size=int(h), channels=int(ch), width=32)
    tcfg = TrainConfig(epochs=s.classifier_epochs, batch_size=64 if not s.fast else 128, lr=2e-3, crop_pad=1)
    key = {"config": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "n": int(len(data.dataset))}
    if log.done("classifier", key) and os.path.isdir(os.path.join(out_dir, "checkpoints")):
        log.record("classifier", key, 0.0, reused=True)
        return load_classifier(out_dir)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    variables, hist = train_classifier(cfg, data.dataset.images, data.dataset.labels, held_out.images,
                                       held_out.labels, tcfg=tcfg, progress=False, stop=stop)
    meta = {"held_out_accuracy": hist["test_acc"][-1], "train_accuracy": hist["train_acc"][-1],
            "n_train": int(len(data.dataset)), "n_held_out": int(len(held_out)), "steps": hist["steps"]}
    save_classifier(out_dir, variables, cfg, meta, step=hist["steps"])
    log.record("classifier", key, time.perf_counter() - t0)
    return load_classifier(out_dir)


def sample_stage(name: str, out_path: str, sampler, params, data, s: SDDemoSettings, key: dict, log):
    """``out_path`` (images uint8 NHWC, labels): ``n_per_class`` images per concept, prompts = templates cycled."""
    from sfd_jax.data.captions import class_prompts
    from sfd_jax.image_io import to_uint8
    if log.done(name, key) and os.path.exists(out_path):
        log.record(name, key, 0.0, reused=True)
        with np.load(out_path) as z:
            return z["images"], z["labels"]
    t0 = time.perf_counter()
    labels = np.repeat(np.arange(data.n_classes, dtype=np.int32), s.n_per_class)
    prompts = [p for k in range(data.n_classes) for p in class_prompts(data.class_names, data.templates, k,
                                                                        s.n_per_class)]
    images = to_uint8(sampler.sample(params, prompts, seed=s.sample_seed, progress=True))
    np.savez_compressed(out_path, images=images, labels=labels)
    log.record(name, key, time.perf_counter() - t0)
    return images, labels


# --------------------------------------------------------------------------------------------------- main
def resolve_concept_lists(data, forget: str | None, override: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Class indices of ``--forget`` (one name or several separated by commas) and ``--override`` (one name for
    all, one per forgotten concept, or by default each concept's next class that is not forgotten); one-line
    UsageErrors for an unknown name, a concept listed twice, a count mismatch or an override that is forgotten."""
    if forget is None or "," not in str(forget) and (override is None or "," not in str(override)):
        k, o = resolve_concepts(data, forget, override)
        return (k,), (o,)
    names = list(data.class_names)
    ks = tuple(_index(names, n.strip(), "forget") for n in str(forget).split(","))
    twice = [k for i, k in enumerate(ks) if k in ks[:i]]
    if twice:
        raise UsageError(f"--forget lists {names[twice[0]]!r} twice")
    if override is None:
        def nxt(k):
            o = (k + 1) % len(names)
            while o in ks:
                o = (o + 1) % len(names)
            return o
        if len(ks) >= len(names):
            raise UsageError("--forget lists every concept; nothing is left to override them with")
        os_ = tuple(nxt(k) for k in ks)
    else:
        os_ = tuple(_index(names, n.strip(), "override") for n in str(override).split(","))
        if len(os_) == 1:
            os_ = os_ * len(ks)
        if len(os_) != len(ks):
            raise UsageError(f"--override names {len(os_)} concepts but --forget {len(ks)}: give one override for all, "
                             "or one per forgotten concept")
    inside = [o for o in os_ if o in ks]
    if inside:
        raise UsageError(f"--override {names[inside[0]]!r} is one of the forgotten concepts")
    return ks, os_


def _index(names: list[str], name: str, flag: str) -> int:
    if name in names:
        return names.index(name)
    lower = [n.lower() for n in names]
    if str(name).lower() in lower:
        return lower.index(str(name).lower())
    raise UsageError(f"--{flag} {name!r} is not a class name; expected one of {', '.join(names)}")


def resolve_concepts(data, forget: str | None, override: str | None) -> tuple[int, int]:
    """Class indices of --forget (default: the first class) and --override (default: the next class)."""
    names = list(data.class_names)
    k = 0 if forget is None else _index(names, forget, "forget")
    o = (k + 1) % len(names) if override is None else _index(names, override, "override")
    if o == k:
        raise UsageError(f"--override must differ from --forget ({names[k]!r})")
    return k, o


def run_sd_demo(workdir: str = "demo_sd", *, data: str = "digits", class_names: str | None = None,
                templates: str | None = None, forget: str | None = None, override: str | None = None,
                fast: bool = False, compile_cache: bool = True) -> dict:
    """Run (or reuse) every stage in ``workdir`` (module docstring); returns the report (also report.json).
    ``compile_cache``: keep JAX's compilation cache in ``WORKDIR/.jax_cache`` unless one is configured already."""
    from sfd_jax.data.captions import load_world_data

    t_start = time.perf_counter()
    s = FAST if fast else SDDemoSettings()
    import jax
    if compile_cache and not jax.config.jax_compilation_cache_dir:   # a rerun (another pair) compiles nothing again
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), ".jax_cache"))
    try:
        train = load_world_data(data, class_names, templates, split="train")
        held = load_world_data(data, class_names, templates, split="test").dataset if data in ("digits",
                                                                                         "fashion_mnist") else None
    except (OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if held is None:   # an npz: the last tenth is held out from the classifier and the VAE
        n = max(1, len(train.dataset) // 10)
        held = train.dataset.subset(np.arange(len(train.dataset) - n, len(train.dataset)))
        train = dataclasses.replace(train, dataset=train.dataset.subset(np.arange(len(train.dataset) - n)))
    ks, os_ = resolve_concept_lists(train, forget, override)
    several = len(ks) > 1
    k, o = (ks, os_) if several else (ks[0], os_[0])
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    log = StageLog(workdir)
    spec = {"data": os.path.abspath(data) if os.path.isfile(data) else data,
            "class_names": os.path.abspath(class_names) if class_names else "",
            "templates": os.path.abspath(templates) if templates else ""}
    job = BackgroundStage(lambda stop: classifier_stage(os.path.join(workdir, "classifier"), train, held, s, log,
                                                        stop=stop), "sd-demo-classifier")
    with job:
        clf = _train_stages(workdir, spec, train, held, k, o, s, log, job)
    print(f"classifier held-out accuracy: {clf.meta['held_out_accuracy']:.4f}", flush=True)

    banner(f"6/6 samples ({s.n_per_class} per concept), evaluation and report")
    world_dir, student_dir = os.path.join(workdir, "world"), os.path.join(workdir, "student")
    pair = _pair(train, k, o)
    forget_dir = os.path.join(workdir, f"forget_{pair}")
    world = json.load(open(os.path.join(workdir, "world_base", "world.json")))
    sfx = f"_{pair}" if several else ""
    rates = _sample_all(workdir, world_dir, student_dir, forget_dir, train, s, log, clf, generator_suffix=sfx)
    if several:
        report = build_multi_report(train, ks, os_, clf, world, rates, log, time.perf_counter() - t_start, s, sfx)
        md = multi_report_markdown(report)
    else:
        report = build_report(train, k, o, clf, world, rates, log, time.perf_counter() - t_start, s)
        md = report_markdown(report)
    with open(os.path.join(workdir, f"report{sfx}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, f"report{sfx}.md"), "w") as f:
        f.write(md)
    print("\n" + md, flush=True)
    return report


def _pair(train, k, o) -> str:
    """``zero_to_one``; several concepts: ``zero-seven_to_one-one``."""
    if isinstance(k, tuple):
        return "-".join(_slug(train.class_names[i]) for i in k) + "_to_" + \
            "-".join(_slug(train.class_names[i]) for i in o)
    return f"{_slug(train.class_names[k])}_to_{_slug(train.class_names[o])}"


def _train_stages(workdir, spec, train, held, k, o, s, log, job):
    """Stages 1-5 (world, teacher + export, student, forgetting, then the background classifier's result)."""
    from sfd_jax.sd.pretrain import SDPretrainTrainer
    from sfd_jax.sd.trainer import SDTrainer
    from sfd_jax.sd.world import VAETraining, build_world_base
    banner(f"1/6 world: VAE ({s.vae_steps} steps) and text encoder for {len(train.dataset)} images, "
           f"{train.n_classes} concepts")
    base = os.path.join(workdir, "world_base")
    vae_s = VAETraining(steps=s.vae_steps)
    world_key = {**spec, "vae": dataclasses.asdict(vae_s), "shape": list(train.dataset.image_shape)}
    if log.done("world", world_key) and os.path.isfile(os.path.join(base, "world.json")):
        log.record("world", world_key, 0.0, reused=True)
    else:
        t0 = time.perf_counter()
        if os.path.isdir(base):
            shutil.rmtree(base)
        build_world_base(base, train, held_out=held.images, vae_training=vae_s)
        log.record("world", world_key, time.perf_counter() - t0)

    t_cfg = teacher_config(base, spec, s)
    banner(f"2/6 teacher: text-to-image training, {t_cfg.training.n_iters} steps of batch {t_cfg.training.batch}"
           " (the evaluation classifier trains alongside)")
    teacher_dir, world_dir = os.path.join(workdir, "teacher"), os.path.join(workdir, "world")
    train_stage("teacher", SDPretrainTrainer, t_cfg, teacher_dir, int(t_cfg.training.n_iters), log)
    if not log.done("export", t_cfg) or not os.path.isfile(os.path.join(world_dir, "model_index.json")):
        from sfd_jax.convert.sd_checkpoints import export_diffusers
        if os.path.isdir(world_dir):
            shutil.rmtree(world_dir)
        t0 = time.perf_counter()
        export_diffusers(teacher_dir, base, world_dir)
        log.record("export", t_cfg, time.perf_counter() - t0)

    several = isinstance(k, tuple)
    prompts = write_prompt_files(os.path.join(workdir, "prompts"), train, k[0] if several else k)
    st_cfg = sfd_config("student", world_dir, prompts, train, k[0] if several else k, o[0] if several else o, s)
    banner(f"3/6 student: one-step SiD distillation, {st_cfg.training.duration_kimg} kimg of batch "
           f"{st_cfg.training.batch}")
    student_dir = os.path.join(workdir, "student")
    train_stage("student", SDTrainer, st_cfg, student_dir, _sd_steps(st_cfg), log)
    pair = _pair(train, k, o)
    if several:
        table = write_table_files(os.path.join(workdir, "prompts"), train, k, o, pair)
        f_cfg = sfd_config("forget", world_dir, prompts, train, k[0], o[0], s, generator_init=student_dir)
        f_cfg.prompts.remain, f_cfg.prompts.forget_table = table["remain"], table["table"]
        f_cfg.prompts.forget = f_cfg.prompts.concept_to_forget = f_cfg.prompts.concept_to_override = ""
        what = ", ".join(f"{train.class_names[a]!r} -> {train.class_names[b]!r}" for a, b in zip(k, o))
    else:
        f_cfg = sfd_config("forget", world_dir, prompts, train, k, o, s, generator_init=student_dir)
        what = f"{train.class_names[k]!r} -> {train.class_names[o]!r}"
    banner(f"4/6 forgetting {what}: {f_cfg.training.duration_kimg} kimg of batch {f_cfg.training.batch}")
    forget_dir = os.path.join(workdir, f"forget_{pair}")
    train_stage(f"forget_{pair}", SDTrainer, f_cfg, forget_dir, _sd_steps(f_cfg), log)

    banner("5/6 evaluation classifier")
    return job.result()


def _sd_steps(config) -> int:
    t = config.training
    return -(-max(int(float(t.duration_kimg) * 1000), 1) // int(t.batch))


def _restore_unet(path: str, comps):
    from sfd_jax.convert.sd_checkpoints import restore_generator
    from sfd_jax.sd.pipeline import abstract_params
    return restore_generator(path, abstract_params(comps.unet), prefer=("generator_ema", "generator"))


def _sample_all(workdir, world_dir, student_dir, forget_dir, data, s: SDDemoSettings, log, clf,
                generator_suffix: str = "") -> dict:
    """Samples, grids and recognition rates of the teacher, the student and the forgetting generator (whose stage
    and files carry ``generator_suffix``: a several-concept run's own)."""
    import jax
    from sfd_jax import parallel
    from sfd_jax.sd.pipeline import load_components
    from sfd_jax.sd.prompt_sampling import GeneratorSampler, TeacherSampler
    from sfd_jax.sd.tokenizer import tokenize
    comps = load_components(world_dir)
    mesh = parallel.make_mesh()
    h, w, _ = data.dataset.image_shape
    latent = (h // 2 ** (len(comps.vae.block_out_channels) - 1), w // 2 ** (len(comps.vae.block_out_channels) - 1),
              comps.unet.in_channels)
    tok = (lambda caps: tokenize(comps.tokenizer, caps))
    teacher = TeacherSampler(comps, mesh, steps=s.teacher_steps, guidance=s.teacher_guidance, tokenize=tok,
                             latent_shape=latent)
    one_step = GeneratorSampler(comps, mesh, t_init=625, tokenize=tok, latent_shape=latent)
    runs = {"teacher": (teacher, comps.unet_params, {"world": world_dir, "steps": s.teacher_steps,
                                                     "w": s.teacher_guidance}),
            "student": (one_step, None, {"run": student_dir}), "generator": (one_step, None, {"run": forget_dir})}
    rates = {}
    for name, (sampler, params, key) in runs.items():
        if params is None:
            _, step, params = _restore_unet(key["run"], comps)
            key = {**key, "step": step}
        key = {**key, "n": s.n_per_class, "seed": s.sample_seed, "templates": list(data.templates)}
        tag = name + (generator_suffix if name == "generator" else "")
        imgs, labels = sample_stage(f"samples_{tag}", os.path.join(workdir, f"samples_{tag}.npz"), sampler,
                                    jax.device_put(params), data, s, key, log)
        save_concept_grid(imgs, labels, data.n_classes, os.path.join(workdir, f"grid_{tag}.png"), s.grid_per_class)
        rates[name] = recognition(clf, imgs, labels, data.n_classes)
    save_concept_grid(data.dataset.images, data.dataset.labels, data.n_classes, os.path.join(workdir, "grid_real.png"),
                      s.grid_per_class)
    return rates
