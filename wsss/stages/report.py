"""Stage report: one self-contained HTML page per run (`report/index.html`).

Headline numbers (CAM seeds, pseudo masks, segmenter; next to another run such as the fully
supervised one when report.compare_run is set), per-class IoU tables with bars, CAM heatmaps and
mask overlays for a sample of images, training curves from the Lightning logs, timings and versions.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from wsss.cam.store import read_cams
from wsss.engine import dist
from wsss.engine.rundir import RunDir
from wsss.io import atomic
from wsss.io.images import read_index_png, read_saliency
from wsss.stages.common import cam_split, split_dataset, stage_main
from wsss.viz.overlays import cam_heatmap, fit_height, mask_overlay, to_data_uri

log = logging.getLogger("wsss")
STAGE = "report"
THUMB = 160


def run(rd: RunDir) -> dict:
    with rd.running(STAGE) as metrics:  # always rebuilt: it is cheap and reflects the whole run
        if not dist.is_main():
            return metrics
        path = rd.sub("report", "index.html")
        atomic.write_text(path, build_html(rd))
        metrics["path"] = str(path)
        log.info("report: %s", path)
    return metrics


# ---- data gathering --------------------------------------------------------------------------

def _load_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_summary(run_dir: Path) -> dict[str, Any]:
    manifest = _load_json(run_dir / "manifest.json") or {}
    stages = manifest.get("stages", {})
    p = stages.get("pseudo", {}).get("metrics", {})
    e = stages.get("evaluate", {}).get("metrics", {})
    return {"name": manifest.get("name", run_dir.name), "seed": p.get("cam_seed_miou"), "seed_t": p.get("cam_seed_best_threshold"),
            "pseudo": p.get("pseudo_miou"), "labelled": p.get("labelled_fraction"), "val": e.get("miou"),
            "protocol": e.get("protocol"), "split": e.get("split")}


def _curves(log_dirs: dict[str, Path]) -> Optional[str]:
    """Training-loss (and val or held-out mIoU) curves from Lightning CSV logs, as an SVG string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, d in log_dirs.items():
        f = d / "logs" / "metrics.csv"
        if not f.is_file():
            continue
        rows = list(csv.DictReader(f.open()))
        for key in ("train/loss", "val/miou", "holdout/miou"):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if pts:
                series[f"{name}: {key}"] = pts
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for label, pts in series.items():
        ax = axes[1] if label.endswith("/miou") else axes[0]
        ax.plot(*zip(*pts), label=label, lw=1.2)
    axes[0].set_title("training loss"), axes[0].set_xlabel("step"), axes[0].legend(fontsize=7)
    axes[1].set_title("mIoU (val: monitor only; holdout: early stopping)"), axes[1].set_xlabel("step")
    if any(k.endswith("/miou") for k in series):
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "not logged (seg.val_every = 0)", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _class_rows(metrics: dict[str, Optional[dict]]) -> tuple[list[str], list[list[Optional[float]]]]:
    names = next(m["class_names"] for m in metrics.values() if m)
    cols = [m["iou"] if m else [None] * len(names) for m in metrics.values()]
    return names, [list(r) for r in zip(*cols)]


def _gallery(rd: RunDir, n: int) -> tuple[list[dict], list[dict]]:
    """Sample panels: train images with CAMs / pseudo / GT, and val images with prediction / GT."""
    cfg = rd.cfg
    train_panels, val_panels = [], []
    if rd.sub("cams").is_dir() or rd.sub("pseudo").is_dir() or rd.sub("saliency").is_dir():
        ds = split_dataset(cfg, cam_split(cfg))
        for sid in _spread(ds.ids, n):
            img = ds.load_image(sid)
            tiles = [("image", img)]
            cam_file = rd.sub("cams", f"{sid}.npz")
            if cam_file.is_file():
                classes, cams = read_cams(cam_file)
                for c, m in zip(classes, cams):
                    tiles.append((f"CAM {ds.class_names[c]}", cam_heatmap(img, m)))
            sal = rd.sub("saliency", f"{sid}.png")
            if sal.is_file():
                tiles.append((f"saliency ({cfg.saliency.source})", cam_heatmap(img, read_saliency(sal, img.shape[:2]))))
            pseudo = rd.sub("pseudo", f"{sid}.png")
            if pseudo.is_file():
                tiles.append(("pseudo mask", mask_overlay(img, read_index_png(pseudo, ds.num_classes, img.shape[:2]))))
            if ds.has_scribbles and cfg.seg.labels == "scribble":
                tiles.append(("scribbles" + (" (simulated)" if ds.scribbles_simulated else ""),
                              mask_overlay(img, ds.load_scribble(sid, img.shape[:2]), alpha=0.9)))
            if ds.has_masks:
                tiles.append(("ground truth", mask_overlay(img, ds.load_mask(sid, img.shape[:2]))))
            train_panels.append({"id": sid, "tiles": [(t, to_data_uri(fit_height(im, THUMB))) for t, im in tiles]})
    if rd.sub("pred").is_dir():
        ds = split_dataset(cfg, cfg.eval.split or cfg.data.val_split)
        for sid in _spread(ds.ids, n):
            pred = rd.sub("pred", f"{sid}.png")
            if not pred.is_file():
                continue
            img = ds.load_image(sid)
            tiles = [("image", img), ("prediction", mask_overlay(img, read_index_png(pred, ds.num_classes, img.shape[:2])))]
            if ds.has_masks:
                tiles.append(("ground truth", mask_overlay(img, ds.load_mask(sid, img.shape[:2]))))
            val_panels.append({"id": sid, "tiles": [(t, to_data_uri(fit_height(im, THUMB))) for t, im in tiles]})
    return train_panels, val_panels


def _spread(ids: list[str], n: int) -> list[str]:
    if len(ids) <= n:
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, n)]


# ---- rendering -------------------------------------------------------------------------------

def _pct(v: Optional[float]) -> str:
    return "&ndash;" if v is None else f"{100 * v:.1f}"


def _bar(v: Optional[float], colour: str) -> str:
    if v is None:
        return '<td class="num">&ndash;</td>'
    return (f'<td class="num"><div class="bar"><span style="width:{100 * v:.1f}%;background:{colour}"></span>'
            f'<em>{100 * v:.1f}</em></div></td>')


def build_html(rd: RunDir) -> str:
    """The whole report page."""
    cfg = rd.cfg
    manifest = rd.read_manifest()
    me = _run_summary(rd.path)
    other = None
    if cfg.report.compare_run:
        other_dir = Path(cfg.report.compare_run)
        if (other_dir / "manifest.json").is_file():
            other = _run_summary(other_dir)
    esc = html.escape
    parts = [f"<h1>wsss run <code>{esc(cfg.run.name)}</code></h1>",
             f"<p class='sub'>data set <b>{esc(cfg.data.dataset)}</b> &middot; stages {esc(', '.join(cfg.run.stages))} "
             f"&middot; segmenter trained on <b>{esc(cfg.seg.labels)}</b> with loss <b>{esc(cfg.seg.loss.name)}</b></p>"]
    if cfg.seg.labels == "scribble" and cfg.data.scribbles.source == "simulate":
        parts.append("<p class='note'>Scribbles in this run are <b>simulated</b> from ground-truth masks "
                     "(wsss.data.scribble_sim.simulate_scribbles), not drawn by people.</p>")
    sal_info = manifest.get("stages", {}).get("saliency", {})
    if sal_info.get("status") == "done":
        parts.append(_saliency_note(sal_info.get("metrics", {})))
    # headline numbers
    head = ["<h2>Headline numbers</h2><table class='grid'><tr><th>run</th><th>CAM seeds (train)</th>"
            "<th>pseudo masks (train)</th><th>segmenter (val)</th></tr>"]
    for s in [me] + ([other] if other else []):
        seed = f"{_pct(s['seed'])} <small>(bg {s['seed_t']:.2f})</small>" if s["seed"] is not None else "&ndash;"
        pseudo = f"{_pct(s['pseudo'])} <small>({_pct(s['labelled'])}% labelled)</small>" if s["pseudo"] is not None else "&ndash;"
        head.append(f"<tr><td>{esc(s['name'])}</td><td class='num'>{seed}</td><td class='num'>{pseudo}</td>"
                    f"<td class='num'><b>{_pct(s['val'])}</b></td></tr>")
    head.append("</table>")
    if other and me["val"] is not None and other["val"]:
        head.append(f"<p>Segmenter mIoU of <b>{esc(me['name'])}</b> is <b>{me['val'] / other['val']:.2f}&times;</b> "
                    f"that of <b>{esc(other['name'])}</b>.</p>")
    if me["protocol"]:
        head.append(f"<p class='sub'>Test protocol: {esc(me['protocol'])}. mIoU from one confusion matrix over the whole split; "
                    "classes enter the mean when present in the ground truth or the prediction.</p>")
    parts.append("".join(head))
    # per-class table
    tables = {"pseudo masks (train)": (_load_json(rd.sub("metrics", "pseudo.json")) or {}).get("pseudo"),
              "segmenter (val)": _load_json(rd.sub("metrics", "evaluate.json"))}
    if other:
        tables[f"{other['name']} (val)"] = _load_json(Path(cfg.report.compare_run) / "metrics" / "evaluate.json")
    tables = {k: v for k, v in tables.items() if v}
    if tables:
        names, rows = _class_rows(tables)
        colours = ["#7aa6d8", "#e6a04c", "#8fc48f"]
        t = ["<h2>Per-class IoU</h2><table class='grid classes'><tr><th>class</th>"]
        t += [f"<th>{esc(k)}</th>" for k in tables] + ["</tr>"]
        for name, row in zip(names, rows):
            t.append(f"<tr><td>{esc(name)}</td>" + "".join(_bar(v, colours[i % 3]) for i, v in enumerate(row)) + "</tr>")
        means = [v.get("miou") for v in tables.values()]
        t.append("<tr class='mean'><td>mean</td>" + "".join(f"<td class='num'><b>{_pct(m)}</b></td>" for m in means) + "</tr></table>")
        parts.append("".join(t))
    # gallery
    train_panels, val_panels = _gallery(rd, cfg.report.samples)
    for title, panels in (("Training images: CAMs, pseudo masks, ground truth", train_panels),
                          ("Validation images: predictions", val_panels)):
        if panels:
            g = [f"<h2>{title}</h2>"]
            for p in panels:
                g.append(f"<div class='row'><div class='id'>{esc(p['id'])}</div>" + "".join(
                    f"<figure><img src='{uri}' alt='{esc(t)}'><figcaption>{esc(t)}</figcaption></figure>" for t, uri in p["tiles"]) + "</div>")
            parts.append("".join(g))
    svg = _curves({"cam": rd.sub("cam"), "seg": rd.sub("seg")})
    if svg:
        parts.append(f"<h2>Training curves</h2><div class='svg'>{svg}</div>")
    # timings and versions
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v.get('status', ''))}</td><td class='num'>{v.get('seconds', '')}</td>"
                   f"<td><code>{esc(str(v.get('config_hash', '')))}</code></td></tr>" for k, v in manifest.get("stages", {}).items())
    parts.append(f"<h2>Stages</h2><table class='grid'><tr><th>stage</th><th>status</th><th>seconds</th><th>config hash</th></tr>{rows}</table>")
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
    parts.append(f"<p class='sub'>Versions: {esc(versions)}. Resolved recipe: <code>{esc(str(rd.sub('config.yaml')))}</code>.</p>")
    return _PAGE.replace("{{title}}", esc(cfg.run.name)).replace("{{body}}", "\n".join(parts))


def _saliency_note(m: dict) -> str:
    """Which saliency source the run used (and its extra supervision), with the maps' quality if measured."""
    from wsss.saliency.sources import SOURCE_NOTES

    source = m.get("source", "?")
    text = f"<p class='note'>Saliency maps (stage saliency) from <b>{html.escape(source)}</b>: {html.escape(SOURCE_NOTES.get(source, ''))}"
    if m.get("crf"):
        text += "; refined with the two-label dense CRF"
    if "mae" in m:
        text += (f". Quality on the train split: MAE {m['mae']:.3f}, max F (&beta;&sup2; = 0.3) {m['max_f']:.3f}, "
                 f"foreground IoU {100 * m['fg_iou']:.1f} at threshold {m['threshold']:.2f}")
    return text + ".</p>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsss report: {{title}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666} .note{background:#fff6db;border:1px solid #f0d890;padding:6px 10px;border-radius:4px}
table.grid{border-collapse:collapse;margin:8px 0} .grid td,.grid th{border:1px solid #ddd;padding:4px 10px;text-align:left}
.grid th{background:#f4f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.classes td.num{min-width:170px} .bar{position:relative;height:18px;background:#f1f1f1;border-radius:2px}
.bar span{position:absolute;left:0;top:0;bottom:0;border-radius:2px} .bar em{position:relative;font-style:normal;padding:0 4px;font-size:12px}
tr.mean td{border-top:2px solid #999} .row{display:flex;gap:6px;align-items:flex-start;margin:8px 0;flex-wrap:wrap}
.row .id{width:110px;font:12px monospace;color:#555;padding-top:4px;word-break:break-all}
figure{margin:0} figure img{height:160px;display:block;border:1px solid #ccc} figcaption{font-size:11px;color:#555;max-width:200px}
.svg svg{max-width:100%;height:auto}
</style></head><body>
{{body}}
</body></html>
"""


if __name__ == "__main__":
    stage_main(STAGE, run, __doc__)
