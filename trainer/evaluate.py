"""Evaluation: top-1/top-5 of the class head and of the token mean, and the robustness suite.

Clean accuracy on the validation shards; ImageNet-C (every `<corruption>/<severity>/*.tar` found under a
directory) → per-corruption errors, mCE and relative mCE (when all 15 are there) and mean accuracy;
ImageNet-A / ImageNet-R with the logits restricted to their 200 classes; retention = robust / clean.
The math lives in `trainer.robustness`; this module only counts correct predictions.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labeler.models import create_token_model, load_checkpoint
from trainer.distributed import DistInfo, all_reduce_sum, sum_over_ranks
from trainer.loader import build_eval_loader
from trainer.loop import amp_context
from trainer.robustness import (
    CORRUPTIONS, corruption_accuracy, corruption_errors, mean_corruption_error, relative_mean_corruption_error,
    retention, subset_class_indices,
)
from trainer.target_builder import normalize


@dataclass
class AccuracyCounts:
    """Correct top-1/top-5 counts of the class head and of the token-mean logits."""

    n: int = 0
    top1: int = 0
    top5: int = 0
    token_top1: int = 0
    token_top5: int = 0

    def add(self, other: "AccuracyCounts") -> None:
        for k in ("n", "top1", "top5", "token_top1", "token_top5"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self) -> dict:
        if self.n == 0:
            raise ValueError("no samples were evaluated (empty or unreadable shards)")
        out = {"samples": self.n, "top1": self.top1 / self.n, "top5": self.top5 / self.n}
        out.update({"token_top1": self.token_top1 / self.n, "token_top5": self.token_top5 / self.n})
        return out


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many labels are among the k highest logits (k is capped at the class count)."""
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum())


def subset_labels(labels: torch.Tensor, indices: Sequence[int], label_space: str, where: str) -> torch.Tensor:
    """Map labels to positions within a 200-class subset.

    label_space "imagenet": labels are ImageNet-1k ids (must be in the subset); "subset": already 0..199.
    """
    if label_space == "subset":
        if labels.min() < 0 or labels.max() >= len(indices):
            raise ValueError(f"{where}: labels must be 0..{len(indices) - 1} with --subset-labels subset")
        return labels
    lookup = torch.full((1000,), -1, dtype=torch.long)
    lookup[torch.tensor(indices)] = torch.arange(len(indices))
    if labels.min() < 0 or labels.max() >= 1000:
        raise ValueError(f"{where}: labels must be ImageNet-1k class ids 0..999")
    mapped = lookup[labels.cpu()].to(labels.device)
    if (mapped < 0).any():
        bad = int(labels[mapped < 0][0])
        raise ValueError(f"{where}: class {bad} is not one of the subset's 200 classes "
                         "(are the labels already 0..199? then pass --subset-labels subset)")
    return mapped


@torch.no_grad()
def count_correct(model: torch.nn.Module, batches: Iterable[dict], *, device: torch.device, mean, std,
                  amp: str = "none", class_subset: Sequence[int] | None = None, label_space: str = "imagenet",
                  where: str = "") -> AccuracyCounts:
    """Counts over `batches` (dicts with uint8 `image` (B,3,H,W) and `label`); logits restricted to a subset."""
    model.eval()
    counts = AccuracyCounts()
    cols = torch.tensor(class_subset, device=device) if class_subset is not None else None
    for batch in batches:
        images = normalize(batch["image"].to(device), mean, std)
        labels = batch["label"].to(device)
        with amp_context(device, amp):
            cls_logits, token_logits = model.forward_tokens(images)
        token_mean = token_logits.float().mean(1) if token_logits is not None else None
        cls_logits = cls_logits.float()
        if cols is not None:
            labels = subset_labels(labels, class_subset, label_space, where)
            cls_logits = cls_logits[:, cols]
            token_mean = token_mean[:, cols] if token_mean is not None else None
        counts.n += len(labels)
        counts.top1 += topk_correct(cls_logits, labels, 1)
        counts.top5 += topk_correct(cls_logits, labels, 5)
        if token_mean is not None:
            counts.token_top1 += topk_correct(token_mean, labels, 1)
            counts.token_top5 += topk_correct(token_mean, labels, 5)
    return counts


def reduce_counts(counts: AccuracyCounts, info: DistInfo) -> AccuracyCounts:
    """Sum counts over ranks (each rank evaluated its own shards)."""
    t = torch.tensor([counts.n, counts.top1, counts.top5, counts.token_top1, counts.token_top5],
                     dtype=torch.float64, device=info.device)
    n, a, b, c, d = (int(v) for v in all_reduce_sum(t, info).tolist())
    return AccuracyCounts(n, a, b, c, d)


def find_corruption_shards(root: str | Path) -> dict[str, dict[int, list[str]]]:
    """`root/<corruption>/<severity>/*.tar` → {corruption: {severity: [shards]}} (ImageNet-C layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-C directory {root} does not exist")
    found: dict[str, dict[int, list[str]]] = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        for sdir in sorted(p for p in cdir.iterdir() if p.is_dir() and p.name.isdigit()):
            shards = sorted(str(s) for s in sdir.glob("*.tar"))
            if shards:
                found.setdefault(cdir.name, {})[int(sdir.name)] = shards
    if not found:
        raise FileNotFoundError(f"{root}: no <corruption>/<severity>/*.tar shards found")
    return found


def corruption_report(errors: Mapping[str, Sequence[float]], clean_error: float) -> dict:
    """IN-C accuracy always; mCE and relative mCE only with all 15 corruptions × 5 severities."""
    all_errors = [e for per in errors.values() for e in per]
    report: dict = {"corruptions": sorted(errors), "accuracy": 1.0 - sum(all_errors) / len(all_errors),
                    "errors": {c: list(v) for c, v in errors.items()}}
    complete = set(errors) == set(CORRUPTIONS) and all(len(v) == 5 for v in errors.values())
    if complete:
        report.update(accuracy=corruption_accuracy(errors), mce=mean_corruption_error(errors),
                      relative_mce=relative_mean_corruption_error(errors, clean_error),
                      corruption_errors=corruption_errors(errors))
    else:
        report.update(mce=None, relative_mce=None,
                      note=f"mCE needs all 15 ImageNet-C corruptions x 5 severities; found {len(errors)} corruption(s)")
    return report


@dataclass
class EvalReport:
    """Everything `stl-train eval` prints and writes as JSON."""

    checkpoint: str
    clean: dict = field(default_factory=dict)
    imagenet_c: dict | None = None
    imagenet_a: dict | None = None
    imagenet_r: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    def table(self) -> str:
        """A fixed-width text table of the headline numbers (percent)."""
        rows = [("set", "top1", "top5", "token top1", "retention / mCE")]
        c = self.clean
        rows.append(("clean", f"{100 * c['top1']:.2f}", f"{100 * c['top5']:.2f}", f"{100 * c['token_top1']:.2f}", ""))
        if self.imagenet_c is not None:
            ic = self.imagenet_c
            extra = f"mCE {100 * ic['mce']:.2f}, rel {100 * ic['relative_mce']:.2f}" if ic.get("mce") is not None \
                else "mCE n/a (not all 15)"
            rows.append(("imagenet-c", f"{100 * ic['accuracy']:.2f}", "", "",
                         f"{_fmt_retention(ic['retention'])}; {extra}"))
        for name, r in (("imagenet-a", self.imagenet_a), ("imagenet-r", self.imagenet_r)):
            if r is not None:
                rows.append((name, f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}",
                             f"{100 * r['token_top1']:.2f}", _fmt_retention(r["retention"])))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _retention(robust: float, clean: float) -> float | None:
    """Retention, or None (JSON null) when the clean accuracy is 0 and the ratio is undefined."""
    return retention(robust, clean) if clean > 0 else None


def _fmt_retention(value: float | None) -> str:
    return "ret n/a" if value is None else f"ret {value:.3f}"


def checkpoint_model_info(path: str | Path) -> tuple[str | None, int | None]:
    """(arch, num_classes) recorded in a checkpoint written by this trainer; (None, None) for foreign files."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # foreign formats (safetensors, pickled args): the caller must name the model
        return None, None
    if not isinstance(ckpt, Mapping):
        return None, None
    num_classes = (ckpt.get("config") or {}).get("model", {}).get("num_classes")
    head = (ckpt.get("state_dict") or {}).get("head.weight")
    if num_classes is None and isinstance(head, torch.Tensor):  # e.g. the slim export for generate
        num_classes = int(head.shape[0])
    return ckpt.get("arch"), num_classes


def evaluate_checkpoint(checkpoint: str | Path, *, model_name: str | None, num_classes: int | None, data,
                        clean_shards, imagenet_c: str | Path | None = None, imagenet_a=None, imagenet_r=None,
                        label_space: str = "imagenet", amp: str = "none", info: DistInfo | None = None,
                        prefer_ema: bool = True) -> EvalReport:
    """Evaluate a checkpoint (EMA weights when present) on clean shards and the robustness sets given.

    `data` is a `trainer.data_config.DataConfig` (input size, crop_pct, mean/std, batch size, workers).
    """
    info = info or DistInfo()
    arch, classes = checkpoint_model_info(checkpoint)
    model_name, num_classes = model_name or arch, num_classes or classes or 1000
    if model_name is None:
        raise ValueError(f"{checkpoint}: no model name recorded in the checkpoint; pass --model")
    if (imagenet_a or imagenet_r) and num_classes != 1000:
        raise ValueError(f"ImageNet-A/-R need a 1000-class ImageNet model; {checkpoint} has {num_classes} classes")
    model = create_token_model(model_name, num_classes=num_classes)
    load_checkpoint(model, checkpoint, prefer_ema=prefer_ema)
    model.to(info.device)

    def accuracy(shards, where, subset=None) -> dict:
        loader = build_eval_loader(data, shards, rank=info.rank, world_size=info.world_size)
        loader.set_epoch(0)
        counts = count_correct(model, loader, device=info.device, mean=data.mean, std=data.std, amp=amp,
                               class_subset=subset, label_space=label_space, where=where)
        out = reduce_counts(counts, info).summary()
        skipped, = sum_over_ranks(info, loader.num_skipped)
        return {**out, "skipped_samples": skipped}

    report = EvalReport(checkpoint=str(checkpoint), clean=accuracy(clean_shards, "clean"))
    clean_acc = report.clean["top1"]
    if imagenet_c is not None:
        errors = {c: [1.0 - accuracy(shards, f"imagenet-c {c}/{s}")["top1"] for s, shards in sorted(sev.items())]
                  for c, sev in find_corruption_shards(imagenet_c).items()}
        report.imagenet_c = corruption_report(errors, 1.0 - clean_acc)
        report.imagenet_c["retention"] = _retention(report.imagenet_c["accuracy"], clean_acc)
    for name, shards in (("imagenet_a", imagenet_a), ("imagenet_r", imagenet_r)):
        if shards:
            r = accuracy(shards, name.replace("_", "-"), subset=subset_class_indices(name))
            r["retention"] = _retention(r["top1"], clean_acc)
            setattr(report, name, r)
    return report
