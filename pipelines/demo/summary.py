"""The demo's closing numbers: corruption scores relative to the no-token-label student, and the table.

The demo's corruptions are not ImageNet-C's 15 and there is no AlexNet on them, so the ImageNet-C
normaliser is replaced by the baseline student trained with the same recipe minus token labels
(Hendrycks & Dietterich 2019 define CE_c = Σ_s E(model, c, s) / Σ_s E(baseline, c, s); they use AlexNet):
the baseline scores 100 by construction, below 100 means fewer corruption errors than the baseline.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def relative_mce(errors: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]]) -> float:
    """100 × mean over corruptions of Σ_s err(model) / Σ_s err(baseline); both share corruptions and severities."""
    if set(errors) != set(baseline) or not errors:
        raise ValueError(f"relative mCE needs the same corruptions for both models, got {sorted(errors)} vs {sorted(baseline)}")
    ces = []
    for c in sorted(errors):
        e, b = list(errors[c]), list(baseline[c])
        if len(e) != len(b):
            raise ValueError(f"corruption {c}: {len(e)} severities vs {len(b)} for the baseline")
        ces.append(sum(e) / max(sum(b), 1e-12))
    return 100.0 * sum(ces) / len(ces)


def mean_accuracy(errors: Mapping[str, Sequence[float]]) -> float:
    """Mean accuracy over every corruption and severity ("IN-C accuracy" in the STL tables)."""
    all_errors = [float(e) for per in errors.values() for e in per]
    if not all_errors:
        raise ValueError("no corruption results")
    return 1.0 - sum(all_errors) / len(all_errors)


def _cell(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def results_table(rows: Sequence[Mapping]) -> str:
    """Fixed-width text table; each row: name, clean, corrupt, mce, token_iou, token_is_class (fractions, mce in %)."""
    head = ("model", "clean top-1", "corrupted top-1", "rel. mCE", "token fg IoU", "tokens = class")
    body = [(r["name"], _cell(None if r.get("clean") is None else 100 * r["clean"], ".1f"),
             _cell(None if r.get("corrupt") is None else 100 * r["corrupt"], ".1f"),
             _cell(r.get("mce"), ".1f"), _cell(r.get("token_iou"), ".3f"),
             _cell(None if r.get("token_is_class") is None else 100 * r["token_is_class"], ".1f"))
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def verdict(with_tokens: Mapping, without: Mapping) -> str:
    """One honest sentence comparing the two students, whatever the sign."""
    def diff(key, scale=100.0):
        a, b = with_tokens.get(key), without.get(key)
        return None if a is None or b is None else scale * (a - b)

    parts = []
    for key, label in (("clean", "clean top-1"), ("corrupt", "corrupted top-1")):
        d = diff(key)
        if d is not None:
            parts.append(f"{label} {d:+.1f} points")
    d = diff("token_iou", 1.0)
    if d is not None:
        parts.append(f"token foreground IoU {d:+.3f}")
    if with_tokens.get("mce") is not None:
        parts.append(f"relative mCE {with_tokens['mce']:.1f} (baseline 100)")
    return "student with token labels vs without: " + ", ".join(parts) if parts else "no comparison available"
