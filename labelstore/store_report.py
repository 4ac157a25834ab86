"""What `stl-labels info` and `stl-labels verify` print: a store summary and its consistency report."""
from __future__ import annotations

from typing import Any

import numpy as np

from labelstore import LabelStore, verify_store
from labelstore.verify import repair_store
from labelstore.schema import DONE, ERRORS


def _stored_bytes(arr: Any) -> int:
    # zarr's own count works for any store backend (local directory, fsspec URL).
    return int(arr.nbytes_stored())


def store_info(path: str, max_invalid: int | None = 10) -> dict[str, Any]:
    """Facts about a store: settings, shards, and per labeler its spec, progress, bytes per view on disk and
    its invalid rows (key, shard, reason; the first `max_invalid`, all when None, and their total)."""
    store = LabelStore.open(path, mode="r")
    shards = store.shards
    urls = {s.index: s.url for s in shards}
    valid = np.asarray(store.samples.valid[:]) if store.num_rows else np.zeros(0, bool)
    info: dict[str, Any] = {
        "path": store.path, **{k: store.attrs.get(k) for k in ("schema_version", "seed", "rows_per_chunk", "created",
                                                                 "tool_version")},
        "shards": len(shards), "sample_rows": sum(s.num_samples for s in shards), "allocated_rows": store.num_rows,
        "valid_rows": int(valid.sum()), "labelers": [],
    }
    for name in store.labelers():
        lab = store.labeler(name)
        spec, done = lab.spec, lab.done_mask()
        done_rows = sum(s.num_samples for s in shards if done[s.index])
        data_paths = [p for p in lab.array_paths if p not in (DONE, ERRORS)]
        data_bytes = sum(_stored_bytes(lab.array(p)) for p in data_paths)
        errors = lab.errors()
        listed = errors if max_invalid is None else errors[:max_invalid]
        views_on_disk = done_rows * spec.views
        info["labelers"].append({
            "name": name, "arch": spec.arch, "num_classes": spec.num_classes, "grid": list(spec.grid),
            "input_size": list(spec.input_size), "views": spec.views, "topk": spec.topk, "seed": spec.seed,
            "checkpoint_sha256": spec.checkpoint_sha256, "view_spec": spec.view_spec.to_dict(),
            "shards_done": int(done.sum()), "shards_total": len(shards), "rows_done": done_rows,
            "errors": len(errors), "bytes_on_disk": data_bytes,
            "invalid_rows": [{"key": e["key"], "shard": e["shard"], "url": urls[e["shard"]], "row": e["row"],
                              "reason": e["reason"]} for e in listed],
            "bytes_per_view": round(data_bytes / views_on_disk, 1) if views_on_disk else None,
            "bytes_per_view_by_array": {p: round(_stored_bytes(lab.array(p)) / views_on_disk, 1) if views_on_disk
                                        else None for p in data_paths},
        })
    return info


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"store       {info['path']}",
        f"            schema {info['schema_version']}, seed {info['seed']}, rows_per_chunk {info['rows_per_chunk']}, "
        f"created {info['created']}, tool {info['tool_version']}",
        f"samples     {info['shards']} shards, {info['sample_rows']} sample rows ({info['valid_rows']} valid, "
        f"{info['allocated_rows']} allocated)",
    ]
    if not info["labelers"]:
        lines.append("labelers    none")
    for lab in info["labelers"]:
        vs = lab["view_spec"]
        per_view = f"{lab['bytes_per_view']:.0f} B/view" if lab["bytes_per_view"] is not None else "no done shards"
        lines += [
            f"labeler     {lab['name']}: {lab['arch']}, {lab['num_classes']} classes, grid {lab['grid'][0]}x{lab['grid'][1]}, "
            f"input {lab['input_size'][0]}x{lab['input_size'][1]}, {lab['views']} views, "
            f"{'dense' if lab['topk'] == 0 else 'top-' + str(lab['topk'])}, seed {lab['seed']}, "
            f"checkpoint {lab['checkpoint_sha256'][:12] or 'NONE: random weights (no checkpoint)'}",
            f"            views: scale {vs['scale']}, ratio {[round(r, 3) for r in vs['ratio']]}, hflip {vs['hflip']}, "
            f"RandAugment {len(vs['ra_ops'])} ops x{vs['ra_num_ops']} slots p={vs['ra_prob']} m={vs['ra_magnitude']}, "
            f"{vs['interpolation']}, algo v{vs['algo_version']}",
            f"            shards done {lab['shards_done']}/{lab['shards_total']}, rows {lab['rows_done']}, "
            f"recorded errors {lab['errors']}, on disk {lab['bytes_on_disk'] / 1e6:.2f} MB = {per_view}",
        ]
        if lab["bytes_per_view"] is not None:
            lines.append("            " + ", ".join(f"{p} {b:.0f}" for p, b in lab["bytes_per_view_by_array"].items()))
        if lab["errors"]:
            shown = lab["invalid_rows"]
            lines.append(f"            invalid rows {lab['errors']}" + (f" (first {len(shown)}):" if len(shown) < lab["errors"] else ":"))
            lines += [f"              {e['key']} in shard {e['shard']} ({e['url']}): {e['reason']}" for e in shown]
            if len(shown) < lab["errors"]:
                lines.append(f"              ... and {lab['errors'] - len(shown)} more (--all-invalid lists every one)")
    return "\n".join(lines)


def verify_report(path: str, labeler: str | None = None, repair: bool = False) -> tuple[str, bool]:
    """(text, ok): every problem on its own line, then a one-line verdict with shards still missing.
    With `repair`, damaged done shards are marked not done (and listed) so `generate` relabels them."""
    cleared: dict[str, list[int]] = {}
    if repair:
        found, cleared = repair_store(path, labeler)
        problems = [str(p) for p in found]
    else:
        problems = verify_store(path, labeler)
    lines = [f"PROBLEM {p}" for p in problems]
    for name, shards in cleared.items():
        lines.append(f"repaired labeler {name}: marked {len(shards)} damaged shard(s) not done ({', '.join(map(str, shards))}); "
                     f"run `stl-labels generate` with the same settings to relabel exactly those")
    if not (problems and problems[0].startswith("cannot open store")):
        store = LabelStore.open(path, mode="r")
        for name in [labeler] if labeler in store.labelers() else ([] if labeler else store.labelers()):
            missing = store.labeler(name).missing_shards()
            if missing:
                shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
                lines.append(f"note    labeler {name}: {len(missing)} of {len(store.shards)} shards not done yet ({shown})")
    lines.append(f"{'FAILED' if problems else 'OK'}: {path}: {len(problems)} problem(s)")
    return "\n".join(lines), not problems
