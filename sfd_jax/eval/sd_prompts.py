"""Images of a distilled SD generator for every (prompt, seed), as the original's ``eval_prompts.py`` default mode.

For every prompt (the lines of the prompt files, in order; blank lines dropped, duplicates removed keeping the
first) and every seed, the one-step (or ``steps``-step) generator of SFD maps the noise to latents,
the VAE decodes them and the image is saved as ``{outdir}/{folder}/{seed:05d}.{png|jpg}``.

- Noise: ``z = jax.random.normal(jax.random.key(seed), (h, w, 4), float32)`` with h = w = resolution / 8, so an
  image depends only on (prompt, seed) — not on the batch size, the padding of the last batch or the device
  count — up to float rounding: XLA may round differently for other batch shapes, which moves a rare value
  across a truncation boundary (one uint8 level; measured: 1 of 12288 values on CPU). With ``steps = k > 1`` the re-noising at step i uses ``normal(fold_in(key(seed), i))``. (The original
  drew z from per-seed torch generators; the values differ, the distribution is the same.)
- uint8: ``clip(x·127.5 + 128, 0, 255)`` **truncated** to uint8, the original's rule (it differs from
  :func:`sfd_jax.image_io.to_uint8`, which rounds ``255·(x+1)/2``; the two can differ by one level).
- JPEG (``fmt='jpg'``) is written by PIL at quality 75, PIL's default that the original used.
- Folder names: the prompt text verbatim (as the original), except that '/' and NUL become '_', a name '.' or
  '..' becomes '_' / '__', and a name longer than 200 UTF-8 bytes is cut to 191 bytes (at a character boundary)
  plus '_' and the first 8 hex digits of the prompt's SHA-1; an empty name becomes '_'. A name equal to
  ``index.json`` (the index file the command writes) gets the same suffix. Should two prompts still share a
  folder (compared case-insensitively), the later one gets the '_<sha1[:8]>' suffix too. ``index.json`` maps
  every prompt to its folder.
- Resumable: existing images are skipped unless ``overwrite``; each file is written under a temporary name and
  renamed, so an interrupted run leaves no truncated image behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sfd_jax.cli_utils import UsageError, check_output_path

MAX_NAME_BYTES = 200
MAX_SEED = 2 ** 31 - 1
FORMATS = ("png", "jpg")
DTYPES = ("float32", "bfloat16")
WEIGHTS = ("ema", "raw")
DEFAULT_INIT_TIMESTEP = 625


# ------------------------------------------------------------------------------------------------ inputs
def parse_seeds(text: str) -> list[int]:
    """'0-19,25' -> [0, 1, ..., 19, 25] (ranges inclusive, as the original's --seeds); order kept, repeats
    dropped. Seeds must lie in [0, 2^31 - 1]."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", part)
        if m is None:
            raise UsageError(f"--seeds must look like '0-19,25' (integers and inclusive ranges), got {text!r}")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        for s in (lo, hi):
            if not 0 <= s <= MAX_SEED:
                raise UsageError(f"--seeds: seed {s} is outside [0, {MAX_SEED}]")
        if hi < lo:
            raise UsageError(f"--seeds: empty range {part!r} (end before start)")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise UsageError(f"--seeds names no seed (got {text!r}); e.g. --seeds=0-19")
    return list(dict.fromkeys(seeds))


def read_prompts(paths: list[str]) -> list[str]:
    """The non-blank lines (stripped) of the files, in order, duplicates removed keeping the first."""
    if not paths:
        raise UsageError("--prompts is required (one or more text files, comma-separated, one prompt a line)")
    prompts: list[str] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f.read().splitlines()]
        lines = [ln for ln in lines if ln]
        if not lines:
            raise UsageError(f"prompt file {path} holds no prompt (no non-blank line)")
        prompts.extend(lines)
    return list(dict.fromkeys(prompts))


def _short_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]


def _with_suffix(name: str, suffix: str) -> str:
    """``name + suffix``, ``name`` cut (at a character boundary) so that the result fits MAX_NAME_BYTES."""
    room = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    return name.encode("utf-8")[:room].decode("utf-8", errors="ignore") + suffix


INDEX_NAME = "index.json"
RESERVED_NAMES = frozenset({INDEX_NAME})   # files the command writes next to the prompt folders


def prompt_folder(prompt: str) -> str:
    """The folder name of one prompt (see the module docstring)."""
    name = prompt.replace("/", "_").replace("\0", "_")
    if name in ("", ".", ".."):
        name = "_" * max(1, len(name))
    if len(name.encode("utf-8")) > MAX_NAME_BYTES or name.casefold() in RESERVED_NAMES:
        name = _with_suffix(name, f"_{_short_hash(prompt)}")
    return name


def prompt_folders(prompts: list[str]) -> list[str]:
    """Folder names of distinct prompts; a name already taken (compared case-insensitively, for case-insensitive
    file systems) gets the '_<sha1[:8]>' suffix (then a counter)."""
    out: list[str] = []
    used: set[str] = set(RESERVED_NAMES)
    for p in prompts:
        name = prompt_folder(p)
        if name.casefold() in used:
            base, name, k = name, _with_suffix(name, f"_{_short_hash(p)}"), 1
            while name.casefold() in used:
                name, k = _with_suffix(base, f"_{_short_hash(p)}_{k}"), k + 1
        used.add(name.casefold())
        out.append(name)
    return out


def uint8_like_original(x):
    """[-1, 1] -> uint8 as the original eval_prompts.py: ``clip(x·127.5 + 128, 0, 255)``, truncated (jnp or np)."""
    if isinstance(x, np.ndarray):
        return np.clip(x.astype(np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)
    import jax.numpy as jnp

    return jnp.clip(x.astype(jnp.float32) * 127.5 + 128.0, 0, 255).astype(jnp.uint8)


def stored_config(checkpoint: str):
    """The training config stored with the checkpoint (ConfigDict), or None when it has none."""
    from sfd_jax.checkpoint import Checkpointer, resolve_checkpoint_dir

    directory, step = resolve_checkpoint_dir(checkpoint)
    try:
        return Checkpointer(directory).restore_config(step)
    except Exception:  # no config item (converted checkpoints), or an unreadable one
        return None


def _config_value(config, section: str, key: str):
    if config is None:
        return None
    try:
        node = config.get(section, None)
        return None if node is None else node.get(key, None)
    except (AttributeError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------- generation
def make_image_fn(unet, vae, text_encoder, alphas_cumprod, t_init: int, num_steps: int, latent_shape):
    """A jitted ``f(unet_params, vae_params, te_params, ids [B,77] int32, seeds [B] int32) -> uint8 [B,H,W,3]``."""
    import jax
    import jax.numpy as jnp

    from sfd_jax.models.clip_text import text_embeddings
    from sfd_jax.models.vae import decode_latents
    from sfd_jax.sd.generator import generate_latents

    ac = np.asarray(alphas_cumprod, np.float32)
    shape = tuple(int(v) for v in latent_shape)

    def draw(keys, i):
        if i == 0:
            return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(keys)

    def fn(unet_params, vae_params, te_params, ids, seeds):
        keys = jax.vmap(jax.random.key)(seeds)
        emb = text_embeddings(text_encoder, te_params, ids)
        noise = [draw(keys, i) for i in range(1, num_steps)]
        latents = generate_latents(unet, unet_params, draw(keys, 0), emb, ac, t_init, num_steps,
                                   noise=noise or None)
        return uint8_like_original(decode_latents(vae, vae_params, latents))

    return jax.jit(fn)


def _save(img: np.ndarray, path: str, fmt: str) -> None:
    from sfd_jax.image_io import to_pil

    tmp = f"{path}.tmp{os.getpid()}"
    im = to_pil(img)   # a one-channel world's images as mode L
    if fmt == "jpg":
        im.save(tmp, format="JPEG", quality=75)
    else:
        im.save(tmp, format="PNG")
    os.replace(tmp, path)


def _latent_geometry(unet, vae, resolution: int | None) -> tuple[int, int]:
    """(resolution in pixels, VAE factor), checked to fit the UNet's down-sampling."""
    factor = 2 ** (len(vae.block_out_channels) - 1)
    res = resolution or unet.sample_size * factor
    unit = factor * 2 ** (len(unet.block_out_channels) - 1)
    if res <= 0 or res % unit:
        raise UsageError(f"--resolution must be a positive multiple of {unit} for this model, got {res}")
    return int(res), factor


def generate_prompt_images(checkpoint: str, prompt_files: list[str], seeds: list[int], outdir: str, *,
                           model: str | None = None, init_timestep: int | None = None, steps: int = 1,
                           batch: int = 64, weights: str = "ema", fmt: str = "png", dtype: str = "float32",
                           resolution: int | None = None, overwrite: bool = False, progress: bool = True,
                           prompts: list[str] | None = None) -> dict:
    """Write the images (see the module docstring) and ``{outdir}/index.json``; returns the index plus
    ``written`` / ``skipped`` counts. ``prompts``, if given, replaces reading ``prompt_files``."""
    if not outdir:
        raise UsageError("--outdir is required (images go to OUTDIR/<prompt>/<seed>.png)")
    if not checkpoint:
        raise UsageError("--checkpoint is required (our checkpoint of a distilled SD generator)")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be png or jpg, got {fmt!r}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be ema or raw, got {weights!r}")
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    check_output_path(outdir, "--outdir", directory=True)
    prompts = list(dict.fromkeys(prompts)) if prompts is not None else read_prompts(prompt_files)
    folders = prompt_folders(prompts)

    config = stored_config(checkpoint)
    model = model or _config_value(config, "sd", "model")
    if not model:
        raise UsageError(f"--model is required: checkpoint {checkpoint} stores no training config naming the "
                         "base SD pipeline (sd.model)")
    if init_timestep is None:
        init_timestep = _config_value(config, "distill", "init_timestep")
        init_timestep = DEFAULT_INIT_TIMESTEP if init_timestep is None else int(init_timestep)

    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from sfd_jax import parallel
    from sfd_jax.convert.sd_checkpoints import GENERATOR_ITEMS, restore_generator
    from sfd_jax.models.sd_unet import UNet2DConditionModel
    from sfd_jax.sd.pipeline import abstract_params, component_dir, load_components, read_json, read_model_index
    from sfd_jax.sd.tokenizer import tokenize

    mesh = parallel.make_mesh()
    rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    comps = load_components(model, dtype=jnp.dtype(dtype),
                            components=("vae", "text_encoder", "tokenizer", "scheduler"),
                            put=lambda a: jax.device_put(a, rep))
    n_train = int(comps.schedule.num_train_timesteps)
    if not 0 <= init_timestep < n_train:
        raise UsageError(f"--init_timestep must be in [0, {n_train}), got {init_timestep}")
    # The UNet module comes from the base pipeline's config; its weights from the checkpoint (the base UNet's
    # weights are never read).
    unet_cfg = read_json(os.path.join(component_dir(comps.path, "unet", read_model_index(comps.path)),
                                      "config.json"), "unet/config.json")
    unet = UNet2DConditionModel.from_config(unet_cfg, dtype=jnp.dtype(dtype))
    res, factor = _latent_geometry(unet, comps.vae, resolution)
    prefer = GENERATOR_ITEMS if weights == "ema" else ("generator",)
    item, step, unet_params = restore_generator(checkpoint, abstract_params(unet), prefer=prefer)
    unet_params = jax.device_put(unet_params, rep)

    index = {"prompts": [{"prompt": p, "folder": f} for p, f in zip(prompts, folders)], "seeds": list(seeds),
             "checkpoint": os.path.abspath(checkpoint), "item": item, "step": int(step),
             "init_timestep": int(init_timestep), "steps": int(steps), "model": model, "resolution": res,
             "format": fmt, "dtype": dtype, "noise": "jax.random.normal(jax.random.key(seed), (h, w, 4))",
             "uint8": "clip(x*127.5+128, 0, 255) truncated"}
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)

    jobs = []  # (prompt index, seed, path)
    skipped = 0
    for pi, folder in enumerate(folders):
        os.makedirs(os.path.join(outdir, folder), exist_ok=True)
        for s in seeds:
            path = os.path.join(outdir, folder, f"{s:05d}.{fmt}")
            if not overwrite and os.path.exists(path):
                skipped += 1
            else:
                jobs.append((pi, s, path))

    written = 0
    if jobs:
        div = parallel.batch_divisor(mesh)
        bsz = -(-min(batch, len(jobs)) // div) * div
        ids_all = tokenize(comps.tokenizer, prompts)
        fn = make_image_fn(unet, comps.vae, comps.text_encoder, comps.schedule.alphas_cumprod, int(init_timestep),
                           int(steps), (res // factor, res // factor, unet.in_channels))
        params = (unet_params, comps.vae_params, comps.text_encoder_params)

        def launch(chunk):
            pad = bsz - len(chunk)
            pis = np.asarray([j[0] for j in chunk] + [chunk[0][0]] * pad)
            sds = np.asarray([j[1] for j in chunk] + [chunk[0][1]] * pad, np.int32)
            return fn(*params, jax.device_put(ids_all[pis], shard), jax.device_put(sds, shard))

        chunks = [jobs[i:i + bsz] for i in range(0, len(jobs), bsz)]
        bar = tqdm(total=len(jobs), desc="prompts", unit="img", disable=not progress)
        with ThreadPoolExecutor(max_workers=8) as pool:
            pending = launch(chunks[0])
            for k, chunk in enumerate(chunks):
                out = pending
                if k + 1 < len(chunks):
                    pending = launch(chunks[k + 1])  # dispatched before the host waits on ``out``
                imgs = np.asarray(jax.device_get(out))
                for fut in [pool.submit(_save, imgs[i], j[2], fmt) for i, j in enumerate(chunk)]:
                    fut.result()
                written += len(chunk)
                bar.update(len(chunk))
        bar.close()
    return dict(index, written=written, skipped=skipped)
