"""`index.html` of a report: the numbers, the histograms and the sample pictures on one static page."""
from __future__ import annotations

import html
from pathlib import Path


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f} %"


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def write_index(path: Path, r: dict) -> None:
    spec = r["labeler_spec"]
    hist = r["confidence_hist"]
    numbers = [
        ("images x views x tokens", f"{r['images']} x {r['views']} x {r['tokens_per_view']}"),
        ("token top-1 = image class", _pct(r["top1_is_image_class"])),
        ("class head top-1 = image class", _pct(r["class_head_top1_is_image_class"])),
        ("mean confidence (max prob)", _num(r["confidence"].get("mean"))),
        (f"mean confidence, foreground / background ({hist['split_by']})",
         f"{_num(hist['foreground_mean'])} / {_num(hist['background_mean'])}"),
        ("mean P(image class) per token", _num(r["p_image_class"].get("mean"))),
        ("tail mass (top-k misses): mean / p90", f"{_num(r['tail_mass'].get('mean'))} / {_num(r['tail_mass'].get('p90'))}"),
        ("a Gumbel draw differs from the argmax", _pct(r["gumbel_changes_argmax"])),
    ]
    mask_table = ""
    if "masks" in r:
        m = r["masks"]
        lines = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{_pct(s['accuracy'])}</td><td>{_pct(s['iou'])}</td>"
            f"<td>{_pct(s['precision'])}</td><td>{_pct(s['recall'])}</td></tr>"
            for name, s in (("argmax == image class", m["argmax"]),
                            (f"P(image class) >= {m['softmax_threshold']['threshold']}", m["softmax_threshold"]),
                            ("Gumbel draw == image class", m["gumbel"])))
        mask_table = (f"<h2>Against the ground-truth object masks</h2><p>Masks rendered with the same stored "
                      f"view params and pooled to the {spec['grid'][0]}x{spec['grid'][1]} token grid; a token is "
                      f"foreground when {html.escape(m['foreground_rule'])} ({_pct(m['object_token_share'])} of tokens).</p>"
                      "<table><tr><th>token is foreground when</th><th>accuracy</th><th>IoU</th><th>precision</th>"
                      f"<th>recall</th></tr>{lines}</table>")
    charts = "".join(f"<figure><img src='{c['file']}'><figcaption>{html.escape(c['caption'])}</figcaption></figure>"
                     for c in r["charts"])
    samples = "".join(f"<figure><img src='{s['file']}'><figcaption>{html.escape(s['key'])}, view {s['view']}, "
                      f"class {html.escape(s['class'])}</figcaption></figure>" for s in r["samples"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Token labels: {html.escape(r['labeler'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1500px}} table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}} figure{{margin:1em 0}} img{{max-width:100%}}</style>
</head><body>
<h1>Token labels of <code>{html.escape(r['labeler'])}</code></h1>
<p>Store <code>{html.escape(r['store'])}</code>; {html.escape(spec['arch'])}, {spec['num_classes']} classes,
input {spec['input_size'][0]}x{spec['input_size'][1]}, token grid {spec['grid'][0]}x{spec['grid'][1]},
{spec['views']} views per image, top-{spec['topk']} stored.</p>
<h2>Numbers</h2><table>{_rows(numbers)}</table>
{mask_table}
<h2>Histograms</h2>{charts}
<h2>Samples</h2><p>Left to right: the view the teacher saw (re-rendered from the stored params), its token labels
(argmax, coloured by class), the confidence map, P(image class) per token, one Gumbel draw{', the ground truth' if 'masks' in r else ''},
and the legend.</p>{samples}
<p>All numbers: <a href="report.json">report.json</a>.</p>
</body></html>
"""
    path.write_text(page)
