"""`stl-labels report`: read a labeler's token labels from a store, measure them, draw them, write a page.

Phases: pick rows → read every view's stored distributions (+ masks rendered with the SAME stored view
params, pooled to the token grid) → numbers (pure, `numbers.py`) → charts → per-sample pictures (the view
re-rendered from stored params) → report.json + index.html.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from labelstore import LabelStore, decode_image, render, render_mask, sample_token_labels
from labelstore.masks import MASK_OBJECT, decode_mask
from labelstore.shard_format import IMAGE_EXTS, expand_shard_urls
from pipelines.report import charts, pictures
from pipelines.report.numbers import TokenArrays, quality_numbers
from pipelines.report.page import write_index
from pipelines.report.sources import class_names, image_bytes, read_fields
from pipelines.report.stats import (
    argmax_labels, class_prob, confidence, pool_mask_to_grid, tail_mass, token_dist,
)

PANEL = 168      # px width of one picture panel


@dataclass(frozen=True)
class ReportConfig:
    store: str
    labeler: str
    out: str
    masks: tuple[str, ...] = ()          # shard URLs/brace patterns holding a `mask` PNG per key
    samples: int = 8
    max_rows: int = 2000
    classes_file: str | None = None
    softmax_threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"report samples must be >= 0, got {self.samples}")
        if self.max_rows < 1:
            raise ValueError(f"report max_rows must be >= 1, got {self.max_rows}")
        if not 0.0 < self.softmax_threshold < 1.0:
            raise ValueError(f"report softmax_threshold must be in (0, 1), got {self.softmax_threshold}")


def select_rows(valid: np.ndarray, done_rows: np.ndarray, max_rows: int) -> np.ndarray:
    """Valid rows of finished shards, thinned evenly to at most `max_rows` (so every shard is represented)."""
    rows = np.flatnonzero(valid & done_rows)
    if rows.size > max_rows:
        rows = rows[np.unique(np.linspace(0, rows.size - 1, max_rows).round().astype(int))]
    return rows


def _done_rows(store, lab) -> np.ndarray:
    done = np.asarray(lab.done_mask(), bool)
    rows = np.zeros(store.num_rows, bool)
    for i, shard in enumerate(store.shards):
        if done[i]:
            rows[shard.first_row:shard.stop] = True
    return rows


def _read_masks(patterns: tuple[str, ...], keys: list[str]) -> dict[str, np.ndarray]:
    urls = expand_shard_urls(list(patterns))
    found = read_fields(urls, set(keys), ("mask",))
    missing = [k for k in keys if "mask" not in found.get(k, {})]
    if missing:
        raise ValueError(f"report --masks {list(patterns)}: no `mask` member for {len(missing)} of {len(keys)} "
                         f"keys (first: {missing[:3]})")
    return {k: decode_mask(found[k]["mask"], f"{k}.mask") for k in keys}


def collect(store, lab, spec, rows: np.ndarray, masks: dict[str, np.ndarray] | None,
            rng: np.random.Generator) -> tuple[TokenArrays, dict]:
    """Per-token arrays over all views of `rows`, plus what the pictures need (params, label maps)."""
    samples = store.read_samples(rows)
    keys = [str(k) for k in samples["key"]]
    labels = samples["label"].astype(np.int64)
    gh, gw = spec.grid
    per_view = []
    for v in range(spec.views):
        got = lab.read(rows, v)
        d = token_dist(got["tokens"], spec.num_classes)
        gumbel = sample_token_labels(got["tokens"], spec.num_classes, "gumbel", rng)
        cls_top1 = argmax_labels(token_dist(got["cls"], spec.num_classes))
        share = None
        if masks is not None:
            share = np.stack([
                pool_mask_to_grid(render_mask(masks[k], got["params"][i], spec.view_spec), (gh, gw), MASK_OBJECT).ravel()
                for i, k in enumerate(keys)])
        # Images without a class (label -1, e.g. plain photos) are measured against the class head's top-1.
        reference = np.where(labels >= 0, labels, cls_top1)
        per_view.append(dict(conf=confidence(d), argmax=argmax_labels(d), p=class_prob(d, reference),
                             tail=tail_mass(d), gumbel=gumbel, cls=cls_top1, share=share, params=got["params"]))

    def stack(name):
        return np.stack([pv[name] for pv in per_view], axis=1)

    arrays = TokenArrays(confidence=stack("conf"), argmax=stack("argmax"), p_label=stack("p"), tail=stack("tail"),
                         gumbel=stack("gumbel"), cls_argmax=stack("cls"), labels=labels,
                         object_share=stack("share") if masks is not None else None)
    return arrays, {"keys": keys, "params": stack("params")}


CONFIDENCE_SERIES = (("foreground", (214, 39, 40)), ("background", (31, 119, 180)))
TAIL_COLOUR = (120, 120, 120)


def draw_charts(numbers: dict, out: Path) -> list[dict]:
    """Histogram PNGs (axes only); caption and legend go into the page. A histogram with no token in it
    is not drawn: its entry carries `empty`, the sentence that says why."""
    hist = numbers["confidence_hist"]
    series = [(name, hist[name]["fractions"], colour) for name, colour in CONFIDENCE_SERIES
              if sum(hist[name]["counts"]) > 0]
    entries = [("confidence_hist.png", series, hist["foreground"]["edges"], "max probability",
                f"Confidence (max probability) of foreground vs background tokens, split by {hist['split_by']} "
                "(paper Fig. 2e).",
                "No confidence histogram: none of these images has a class label or a mask, so no token can be "
                "called foreground or background."),
               ("tail_mass_hist.png", [("all tokens", numbers["tail_mass"]["histogram"]["fractions"], TAIL_COLOUR)]
                if sum(numbers["tail_mass"]["histogram"]["counts"]) > 0 else [],
                numbers["tail_mass"]["histogram"]["edges"], "probability outside the stored top-k",
                "How much probability the stored top-k leaves out (0 for a dense store).",
                "No tail-mass histogram: no token was read.")]
    files = []
    for name, chart_series, edges, xlabel, caption, empty in entries:
        legend = [{"colour": pictures.hex_colour(c), "name": n} for n, _, c in chart_series]
        if not chart_series:
            files.append({"file": None, "caption": caption, "legend": [], "empty": empty})
            continue
        charts.bar_chart(edges, chart_series, "", xlabel, "share of tokens").save(out / name)
        files.append({"file": name, "caption": caption, "legend": legend, "empty": None})
    return files


def _class_legend(grid: np.ndarray, colours: np.ndarray, names: list[str], ref: int, ref_tag: str) -> list[dict]:
    """Legend of one token-label panel: its own classes, most frequent first, with their token share."""
    counts = np.bincount(grid.ravel(), minlength=len(names))
    shown = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    entries = [{"colour": pictures.hex_colour(colours[c]), "name": names[c] + (f" ({ref_tag})" if c == ref else ""),
                "share": float(counts[c] / grid.size)} for c in shown[:len(pictures.PALETTE)]]
    rest = shown[len(pictures.PALETTE):]
    if rest:
        entries.append({"colour": pictures.hex_colour(pictures.OTHER), "name": f"{len(rest)} other classes",
                        "share": float(counts[rest].sum() / grid.size)})
    return entries


def draw_samples(store, spec, arrays: TokenArrays, extra: dict, masks, names: list[str], n: int, out: Path) -> list[dict]:
    """Pictures for `n` (row, view) pairs spread over the rows: view, token labels, confidence, P(class),
    a Gumbel draw, and the ground-truth object mask on the token grid when masks are given. One PNG per
    panel; captions and legends are returned for the page."""
    if n == 0 or arrays.labels.size == 0:
        return []
    picks = np.unique(np.linspace(0, arrays.labels.size - 1, min(n, arrays.labels.size)).round().astype(int))
    keys = [extra["keys"][i] for i in picks]
    urls = [s.url for s in store.shards]
    found = read_fields(urls, set(keys), IMAGE_EXTS)
    gh, gw = spec.grid
    out_samples = []
    for j, i in enumerate(picks):
        key, view = extra["keys"][i], j % spec.views
        src = image_bytes(found.get(key, {}))
        if src is None:
            continue  # image not readable any more: the numbers still count it, the picture is skipped
        image = decode_image(src[0], f"{key}.{src[1]}", spec.view_spec.fill)
        params = extra["params"][i, view]
        view_px = render(image, params, spec.view_spec)
        fill_share = float(np.mean(render_mask(np.ones((image.height, image.width), np.uint8), params, spec.view_spec) == 0))
        label = int(arrays.labels[i])
        am = arrays.argmax[i, view].reshape(gh, gw)
        gb = arrays.gumbel[i, view].reshape(gh, gw)
        head = int(arrays.cls_argmax[i, view])
        label_name = names[label] if label >= 0 else f"none; class head: {names[head]}"
        ref, ref_tag = (label, "image class") if label >= 0 else (head, "class head")
        # One colour per class for the whole sample (argmax and Gumbel panels agree), most frequent first.
        both = np.bincount(np.concatenate([am.ravel(), gb.ravel()]), minlength=spec.num_classes)
        colours = pictures.class_colours([int(c) for c in np.argsort(-both, kind="stable") if both[c] > 0],
                                         spec.num_classes)
        fill = (f"; grey areas ({fill_share:.0%} of it) are the view's fill, outside the photo"
                if fill_share > 0.005 else "")
        panels = [("view", pictures.resized(view_px, PANEL), f"View {view} as the teacher saw it{fill}.", None, None),
                  ("argmax", pictures.overlay(view_px, colours[am], PANEL),
                   f"Token labels (argmax): {np.mean(am == ref):.0%} of tokens = {ref_tag}.",
                   _class_legend(am, colours, names, ref, ref_tag), None),
                  ("confidence", pictures.upscale(pictures.heat(arrays.confidence[i, view].reshape(gh, gw)), PANEL),
                   "Confidence (max probability) per token.", None, "heat"),
                  ("foreground", pictures.upscale(pictures.heat(arrays.p_label[i, view].reshape(gh, gw)), PANEL),
                   f"Foreground: P({ref_tag}) per token.", None, "heat"),
                  ("gumbel", pictures.overlay(view_px, colours[gb], PANEL),
                   f"One Gumbel draw: {np.mean(gb != am):.0%} of tokens differ from the argmax.",
                   _class_legend(gb, colours, names, ref, ref_tag), None)]
        if masks is not None:
            share = arrays.object_share[i, view].reshape(gh, gw)
            panels.append(("object_share", pictures.upscale(pictures.heat(share), PANEL),
                           "Ground-truth object share per token.", None, "heat"))
            full = render_mask(masks[key], params, spec.view_spec)
            panels.append(("object_mask", pictures.overlay(view_px, pictures.heat((full == MASK_OBJECT) * 1.0), PANEL,
                                                           0.5, lines=False),
                           "Object mask, rendered with the same view params.", None, None))
        saved = []
        for kind, img, caption, legend, scale in panels:
            name = f"sample_{j:03d}_{kind}.png"
            img.save(out / name)
            saved.append({"kind": kind, "file": name, "caption": caption, "legend": legend, "scale": scale})
        out_samples.append({"key": key, "view": int(view), "class": label_name, "fill_share": fill_share,
                            "top1_is_reference": float(np.mean(am == ref)), "reference": ref_tag, "panels": saved})
    return out_samples


def build_report(cfg: ReportConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Write report.json, index.html and PNGs under cfg.out; return the report dict."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    store = LabelStore.open(cfg.store)
    lab = store.labeler(cfg.labeler)
    spec = lab.spec
    names = class_names(spec.num_classes, cfg.classes_file)
    valid = store.read_samples(slice(0, store.num_rows))["valid"].astype(bool)
    rows = select_rows(valid, _done_rows(store, lab), cfg.max_rows)
    if rows.size == 0:
        raise ValueError(f"store {cfg.store}: labeler {cfg.labeler!r} has no finished valid rows to report on")
    keys = [str(k) for k in store.read_samples(rows)["key"]]
    masks = _read_masks(cfg.masks, keys) if cfg.masks else None
    arrays, extra = collect(store, lab, spec, rows, masks, np.random.default_rng(cfg.seed))
    numbers = quality_numbers(arrays, cfg.softmax_threshold)
    say(f"report: {rows.size} images x {spec.views} views x {spec.grid[0] * spec.grid[1]} tokens read "
        f"({time.perf_counter() - t0:.1f} s)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    chart_files = draw_charts(numbers, out)
    sample_files = draw_samples(store, spec, arrays, extra, masks, names, cfg.samples, out)
    report = {"store": str(cfg.store), "labeler": cfg.labeler, "settings": _settings(cfg),
              "labeler_spec": {"arch": spec.arch, "num_classes": spec.num_classes, "grid": list(spec.grid),
                               "input_size": list(spec.input_size), "views": spec.views, "topk": spec.topk,
                               "checkpoint_sha256": spec.checkpoint_sha256},
              "rows_total": int(store.num_rows), **numbers, "charts": chart_files, "samples": sample_files}
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1))
    write_index(out / "index.html", report)
    say(f"report: wrote {out / 'index.html'} ({len(sample_files)} samples, {time.perf_counter() - t0:.1f} s)")
    return report


def _settings(cfg: ReportConfig) -> dict:
    d = asdict(cfg)
    d["masks"] = list(cfg.masks)
    return d


def _json_safe(x):
    """NaN -> null, so report.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
