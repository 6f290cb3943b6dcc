"""The SD demo's evaluation and report (:mod:`sfd_jax.sd.demo`): recognition rates per concept, the targets,
``report.md`` / ``report.json`` content and the concept grids."""
from __future__ import annotations

import dataclasses

import numpy as np

TARGETS = {"forgotten_rate": ("<=", 0.10), "override_rate": (">=", 0.50), "others_kept_ratio": (">=", 0.85)}
TARGET_TEXT = {"forgotten_rate": "generator images of the forgotten concept recognised as it",
               "override_rate": "... recognised as the override concept",
               "others_kept_ratio": "other concepts: generator rate / teacher rate (mean)"}


def save_concept_grid(images, labels, n_classes: int, path: str, per_class: int, scale: int = 4) -> None:
    """One row per concept (its first ``per_class`` images), 1-pixel gaps, upscaled ``scale`` x (nearest)."""
    from sfd_jax.image_io import make_grid, save_png
    rows = [images[np.flatnonzero(labels == c)[:per_class]] for c in range(n_classes)]
    grid = make_grid(np.concatenate(rows), nrow=per_class, padding=1)
    save_png(np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1), path)


def recognition(clf, images, labels, n_classes: int) -> dict:
    """Per concept: the fraction of its images the classifier assigns to it, and the counts of every class."""
    from sfd_jax.eval.classifier_train import predict_logits
    pred = np.argmax(predict_logits(clf.config, clf.variables, images), -1)
    return {str(c): {"rate": float(np.mean(pred[labels == c] == c)),
                     "recognised_as": np.bincount(pred[labels == c], minlength=n_classes).tolist()}
            for c in range(n_classes)}


def build_report(data, forget: int, override: int, clf, world: dict, rates: dict, log, wall: float,
                 s) -> dict:
    t, g = rates["teacher"], rates["generator"]
    others = [c for c in range(data.n_classes) if c != forget]
    t_other = float(np.mean([t[str(c)]["rate"] for c in others]))
    g_other = float(np.mean([g[str(c)]["rate"] for c in others]))
    n_forget = sum(g[str(forget)]["recognised_as"])
    values = {"forgotten_rate": g[str(forget)]["rate"],
              "override_rate": g[str(forget)]["recognised_as"][override] / max(n_forget, 1),
              "others_kept_ratio": g_other / max(t_other, 1e-9)}
    checks = {}
    for k, v in values.items():
        op, thr = TARGETS[k]
        checks[k] = {"what": TARGET_TEXT[k], "value": v, "target": f"{op} {thr:.2f}",
                     "pass": bool(v <= thr if op == "<=" else v >= thr)}
    return {
        "fast": s.fast, "forget": data.class_names[forget], "override": data.class_names[override],
        "forget_class": forget, "override_class": override, "class_names": list(data.class_names),
        "templates": list(data.templates), "all_targets_met": all(c["pass"] for c in checks.values()),
        "targets": checks,
        "others_min_ratio": float(min(g[str(c)]["rate"] / max(t[str(c)]["rate"], 1e-9) for c in others)),
        "per_concept": {data.class_names[c]: {w: rates[w][str(c)]["rate"] for w in rates}
                        for c in range(data.n_classes)},
        "recognition": rates, "world": world,
        "classifier": {k: clf.meta[k] for k in ("held_out_accuracy", "n_train", "n_held_out")},
        "settings": dataclasses.asdict(s),
        "timings_s": {"stages": log.this_run, "total_this_run": round(wall, 2)},
        "files": ["samples_teacher.npz", "samples_student.npz", "samples_generator.npz", "grid_real.png",
                  "grid_teacher.png", "grid_student.png", "grid_generator.png"],
    }


def report_markdown(r: dict) -> str:
    md = [f"# SFD text-to-image demo: forgetting \"{r['forget']}\" (override \"{r['override']}\")", ""]
    if r["fast"]:
        md += ["**fast run: every stage shrunk to seconds; the numbers mean nothing.**", ""]
    md += ["| target | value | required | result |", "|---|---|---|---|"]
    md += [f"| {c['what']} | {c['value']:.3f} | {c['target']} | {'PASS' if c['pass'] else 'FAIL'} |"
           for c in r["targets"].values()]
    md += ["", "## Recognised as the prompted concept (evaluation classifier)", "",
           "| concept | teacher | student | generator (after forgetting) |", "|---|---|---|---|"]
    for name, v in r["per_concept"].items():
        mark = " (forgotten)" if name == r["forget"] else (" (override)" if name == r["override"] else "")
        md.append(f"| {name}{mark} | {v['teacher']:.3f} | {v['student']:.3f} | {v['generator']:.3f} |")
    w = r["world"]
    md += ["", "## World", "",
           f"- VAE: held-out reconstruction MSE {w['vae']['held_out_mse']:.5f} in [-1, 1] "
           f"(PSNR {w['vae']['held_out_psnr_db']:.1f} dB), latent scaling factor {w['vae']['scaling_factor']:.4f}.",
           f"- Frozen random CLIP text encoder: cosine of two captions of one concept "
           f"{w['text']['cosine_same_class_other_template']:.3f}, of two concepts with the same template "
           f"{w['text']['cosine_other_class_same_template']:.3f}; nearest class centroid names the concept of a "
           f"caption with an unseen template in {w['text']['centroid_unseen_template_accuracy']:.3f} of cases.",
           f"- Classifier held-out accuracy {r['classifier']['held_out_accuracy']:.4f} "
           f"({r['classifier']['n_held_out']} images).", "",
           "## Grids (one row per concept)", "",
           "Real: ![real](grid_real.png) Teacher: ![teacher](grid_teacher.png) Student: ![student](grid_student.png) "
           "Generator: ![generator](grid_generator.png)", "", "## Timings", "", "| stage | seconds | |", "|---|---|---|"]
    for name, v in r["timings_s"]["stages"].items():
        md.append(f"| {name} | {v['seconds']:.1f} | {'reused' if v['reused'] else ''} |")
    md.append(f"| total | {r['timings_s']['total_this_run']:.1f} | |")
    return "\n".join(md) + "\n"


