"""`index.html` of a report: the numbers, the histograms and the sample pictures on one static page.

Captions, legends and tables are HTML (readable at any window width; the PNGs hold pictures and axes
only). A figure with nothing to show is replaced by a sentence saying why, and a number that cannot be
measured (no image has a class) is left out of the table with one note instead of a row of "n/a".
"""
from __future__ import annotations

import html
from pathlib import Path

from pipelines.report.pictures import HEAT_STOPS, hex_colour

RANDOM_WEIGHTS = "random weights (no checkpoint)"

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1500px;line-height:1.35}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
.warning{background:#fde2e1;border:2px solid #be0032;padding:.6em 1em;font-weight:bold}
.note{color:#444}.panels{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0 0 1em 0;width:190px}figure.chart{width:auto;max-width:600px}figure img{width:100%;height:auto;
image-rendering:pixelated}figcaption{font-size:14px}ul.legend{list-style:none;padding:0;margin:4px 0;font-size:13px}
ul.legend li{margin:2px 0}.swatch{display:inline-block;width:12px;height:12px;border:1px solid #000;
margin-right:6px;vertical-align:middle}.scale{height:12px;border:1px solid #000;margin-top:4px}
.scale-labels{display:flex;justify-content:space-between;font-size:12px}section.sample{border-top:1px solid #ddd;
padding-top:.5em}"""


def _pct(v) -> str | None:
    return None if v is None or v != v else f"{100 * v:.1f} %"


def _num(v) -> str | None:
    return None if v is None or v != v else f"{v:.3f}"


def _rows(pairs: list[tuple[str, str | None]]) -> str:
    """Table rows of the pairs that have a value (a number that cannot be measured is left out)."""
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs if v is not None)


def _pair(a: str | None, b: str | None) -> str | None:
    return None if a is None and b is None else f"{a or 'n/a'} / {b or 'n/a'}"


def teacher_weights(spec: dict) -> str:
    sha = spec.get("checkpoint_sha256") or ""
    return f"checkpoint sha256 {sha[:12]}" if sha else RANDOM_WEIGHTS


def _legend(entries: list[dict] | None) -> str:
    if not entries:
        return ""
    items = "".join(f"<li><span class='swatch' style='background:{e['colour']}'></span>{html.escape(e['name'])}"
                    + (f" <span class='note'>({100 * e['share']:.0f} %)</span>" if "share" in e else "") + "</li>"
                    for e in entries)
    return f"<ul class='legend'>{items}</ul>"


def _heat_scale() -> str:
    stops = ", ".join(hex_colour(c) for c in HEAT_STOPS)
    return (f"<div class='scale' style='background:linear-gradient(to right, {stops})'></div>"
            "<div class='scale-labels'><span>0</span><span>0.5</span><span>1</span></div>")


def _figure(file: str, caption: str, legend: list[dict] | None = None, scale: str | None = None,
            cls: str = "", alt: str = "") -> str:
    return (f"<figure class='{cls}'><img src='{html.escape(file)}' alt='{html.escape(alt or caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption>{_legend(legend)}"
            f"{_heat_scale() if scale == 'heat' else ''}</figure>")


def _charts(charts: list[dict]) -> str:
    parts = []
    for c in charts:
        if c.get("file"):
            parts.append(_figure(c["file"], c["caption"], c.get("legend"), cls="chart"))
        else:
            parts.append(f"<p class='empty note'>{html.escape(c['empty'])}</p>")
    return "<div class='panels'>" + "".join(parts) + "</div>"


def _samples(samples: list[dict]) -> str:
    parts = []
    for s in samples:
        figures = "".join(_figure(p["file"], p["caption"], p.get("legend"), p.get("scale"), cls=p["kind"])
                          for p in s["panels"])
        parts.append(f"<section class='sample'><h3>{html.escape(s['key'])}, view {s['view']}, class "
                     f"{html.escape(s['class'])}</h3><div class='panels'>{figures}</div></section>")
    return "".join(parts)


def write_index(path: Path, r: dict) -> None:
    spec = r["labeler_spec"]
    hist = r["confidence_hist"]
    numbers = [
        ("images x views x tokens", f"{r['images']} x {r['views']} x {r['tokens_per_view']}"),
        ("token top-1 = image class", _pct(r["top1_is_image_class"])),
        ("class head top-1 = image class", _pct(r["class_head_top1_is_image_class"])),
        ("mean confidence (max prob)", _num(r["confidence"].get("mean"))),
        (f"mean confidence, foreground / background ({hist['split_by']})",
         _pair(_num(hist["foreground_mean"]), _num(hist["background_mean"]))),
        ("mean P(image class) per token", _num(r["p_image_class"].get("mean"))),
        ("tail mass (top-k misses): mean / p90", _pair(_num(r["tail_mass"].get("mean")), _num(r["tail_mass"].get("p90")))),
        ("a Gumbel draw differs from the argmax", _pct(r["gumbel_changes_argmax"])),
    ]
    left_out = sum(v is None for _, v in numbers)
    no_class = ("" if r.get("images_with_class", r["images"]) else
                "<p class='note'>None of these images has a class label (plain photos, say), so the numbers that "
                "compare tokens with the image class are left out; the pictures compare with the class head's "
                "top-1 instead.</p>")
    if left_out and not no_class:
        no_class = f"<p class='note'>{left_out} number(s) could not be measured on these rows and are left out.</p>"
    mask_table = ""
    if "masks" in r:
        m = r["masks"]
        lines = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{_pct(s['accuracy']) or 'n/a'}</td><td>{_pct(s['iou']) or 'n/a'}</td>"
            f"<td>{_pct(s['precision']) or 'n/a'}</td><td>{_pct(s['recall']) or 'n/a'}</td></tr>"
            for name, s in (("argmax == image class", m["argmax"]),
                            (f"P(image class) >= {m['softmax_threshold']['threshold']}", m["softmax_threshold"]),
                            ("Gumbel draw == image class", m["gumbel"])))
        mask_table = (f"<h2>Against the ground-truth object masks</h2><p>Masks rendered with the same stored "
                      f"view params and pooled to the {spec['grid'][0]}x{spec['grid'][1]} token grid; a token is "
                      f"foreground when {html.escape(m['foreground_rule'])} ({_pct(m['object_token_share']) or 'n/a'} "
                      "of tokens).</p><table><tr><th>token is foreground when</th><th>accuracy</th><th>IoU</th>"
                      f"<th>precision</th><th>recall</th></tr>{lines}</table>")
    weights = teacher_weights(spec)
    warning = (f"<p class='warning'>Teacher: {RANDOM_WEIGHTS}. These token labels come from an untrained model "
               "and are noise.</p>" if weights == RANDOM_WEIGHTS else "")
    samples = _samples(r["samples"]) if r["samples"] else "<p class='empty note'>No sample pictures were asked for (--samples 0) or none of the images could be read.</p>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Token labels: {html.escape(r['labeler'])}</title><style>{CSS}</style></head><body>
<h1>Token labels of <code>{html.escape(r['labeler'])}</code></h1>
{warning}<p id="header">Store <code>{html.escape(r['store'])}</code>; {html.escape(spec['arch'])}, teacher weights:
{html.escape(weights)}; {spec['num_classes']} classes, input {spec['input_size'][0]}x{spec['input_size'][1]},
token grid {spec['grid'][0]}x{spec['grid'][1]}, {spec['views']} views per image, top-{spec['topk']} stored.</p>
<h2>Numbers</h2><table id="numbers">{_rows(numbers)}</table>{no_class}
{mask_table}
<h2>Histograms</h2>{_charts(r['charts'])}
<h2>Samples</h2><p>Per sample, left to right: the view the teacher saw (re-rendered from the stored params; grey
areas are the view's fill where it reaches outside the photo), its token labels (argmax, one colour per class,
legend under the picture), the confidence map, P(reference class) per token, one Gumbel draw (its own legend){', the ground truth' if 'masks' in r else ''}.
The colours of a sample are the same in its argmax and Gumbel pictures.</p>{samples}
<p>All numbers: <a href="report.json">report.json</a>.</p>
</body></html>
"""
    path.write_text(page)
