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




def build_multi_report(data, forget: tuple[int, ...], override: tuple[int, ...], clf, world: dict, rates: dict, log,
                       wall: float, s, suffix: str) -> dict:
    """The report of a run forgetting several concepts at once: per forgotten concept its rate as itself (<= 0.10)
    and as its own override (>= 0.50); the concepts not forgotten: generator / teacher rate (mean >= 0.85)."""
    t, g = rates["teacher"], rates["generator"]
    names = list(data.class_names)
    others = [c for c in range(data.n_classes) if c not in forget]
    t_other = float(np.mean([t[str(c)]["rate"] for c in others]))
    g_other = float(np.mean([g[str(c)]["rate"] for c in others]))
    checks, per_forgotten = {}, {}
    for k, o in zip(forget, override):
        n_k = max(sum(g[str(k)]["recognised_as"]), 1)
        per_forgotten[names[k]] = {"override": names[o], "rate_as_itself": g[str(k)]["rate"],
                                   "rate_as_override": g[str(k)]["recognised_as"][o] / n_k,
                                   "teacher_rate": t[str(k)]["rate"], "student_rate": rates["student"][str(k)]["rate"]}
        for key, v, what in (("forgotten_rate", g[str(k)]["rate"], f"generator images of {names[k]!r} recognised as it"),
                             ("override_rate", per_forgotten[names[k]]["rate_as_override"],
                              f"... of {names[k]!r} recognised as its override {names[o]!r}")):
            op, thr = TARGETS[key]
            checks[f"{key}_{names[k]}"] = {"what": what, "value": v, "target": f"{op} {thr:.2f}",
                                           "pass": bool(v <= thr if op == "<=" else v >= thr)}
    op, thr = TARGETS["others_kept_ratio"]
    ratio = g_other / max(t_other, 1e-9)
    checks["others_kept_ratio"] = {"what": f"the {len(others)} other concepts: generator rate / teacher rate (mean)",
                                   "value": ratio, "target": f"{op} {thr:.2f}", "pass": bool(ratio >= thr)}
    return {
        "fast": s.fast, "forget": [names[k] for k in forget], "override": [names[o] for o in override],
        "forget_class": list(forget), "override_class": list(override), "class_names": names,
        "templates": list(data.templates), "all_targets_met": all(c["pass"] for c in checks.values()),
        "targets": checks, "per_forgotten": per_forgotten,
        "others_min_ratio": float(min(g[str(c)]["rate"] / max(t[str(c)]["rate"], 1e-9) for c in others)),
        "per_concept": {names[c]: {w: rates[w][str(c)]["rate"] for w in rates} for c in range(data.n_classes)},
        "recognition": rates, "world": world,
        "classifier": {k: clf.meta[k] for k in ("held_out_accuracy", "n_train", "n_held_out")},
        "settings": dataclasses.asdict(s),
        "timings_s": {"stages": log.this_run, "total_this_run": round(wall, 2)},
        "files": ["samples_teacher.npz", "samples_student.npz", f"samples_generator{suffix}.npz", "grid_real.png",
                  "grid_teacher.png", "grid_student.png", f"grid_generator{suffix}.png"],
    }


def multi_report_markdown(r: dict) -> str:
    pairs = ", ".join(f"\"{k}\" -> \"{o}\"" for k, o in zip(r["forget"], r["override"]))
    md = [f"# SFD text-to-image demo: forgetting {len(r['forget'])} concepts in one run ({pairs})", ""]
    if r["fast"]:
        md += ["**fast run: every stage shrunk to seconds; the numbers mean nothing.**", ""]
    md += ["| target | value | required | result |", "|---|---|---|---|"]
    md += [f"| {c['what']} | {c['value']:.3f} | {c['target']} | {'PASS' if c['pass'] else 'FAIL'} |"
           for c in r["targets"].values()]
    md += ["", "## Recognised as the prompted concept (evaluation classifier)", "",
           "| concept | teacher | student | generator (after forgetting) |", "|---|---|---|---|"]
    overrides = set(r["override"])
    for name, v in r["per_concept"].items():
        mark = " (forgotten)" if name in r["forget"] else (" (override)" if name in overrides else "")
        md.append(f"| {name}{mark} | {v['teacher']:.3f} | {v['student']:.3f} | {v['generator']:.3f} |")
    md += ["", "| forgotten concept | override | recognised as itself | recognised as its override |",
           "|---|---|---|---|"]
    md += [f"| {k} | {v['override']} | {v['rate_as_itself']:.3f} | {v['rate_as_override']:.3f} |"
           for k, v in r["per_forgotten"].items()]
    f = r["files"]
    md += ["", f"Lowest generator/teacher ratio of the other concepts: {r['others_min_ratio']:.3f}. Classifier "
           f"held-out accuracy {r['classifier']['held_out_accuracy']:.4f}.", "",
           f"Grids (one row per concept): teacher ![teacher]({f[4]}) student ![student]({f[5]}) generator "
           f"![generator]({f[6]})", "", "## Timings", "", "| stage | seconds | |", "|---|---|---|"]
    for name, v in r["timings_s"]["stages"].items():
        md.append(f"| {name} | {v['seconds']:.1f} | {'reused' if v['reused'] else ''} |")
    md.append(f"| total | {r['timings_s']['total_this_run']:.1f} | |")
    return "\n".join(md) + "\n"
