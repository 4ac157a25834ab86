"""The one call the training loop makes per step: a collated batch → (images, class target, token target).

On the training device: for a device-path batch (decoded sources + stored view params), the replay
render (`labeler.render_batch`, the labeler's one definition) and the drawn photometric slots
(`trainer.photometric_graph`: one captured CUDA graph per batch on a GPU); then uint8 → float normalised,
random erasing, token targets from the stored logits (Gumbel/softmax/argmax, grid resampling, smoothing), then Mixup/CutMix of images, class
targets and (token_mix=follow) token targets. All randomness comes from (seed, rank, step): ranks draw
differently, and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import numpy as np
import torch

from labeler.device import to_device
from labeler.flat_images import upload_flat
from labeler.render_batch import render_batch
from trainer.data_config import DataConfig, TokenLabelConfig
from trainer.mixing import MixParams, draw_mix, mix_class_targets, mix_images, mix_token_targets
from trainer.photometric_graph import PhotometricGraph
from trainer.student_augment import build_random_erasing, seeded_global_random
from trainer.token_targets import token_targets

_STEP_TAG = 0x5354_4550  # "STEP"


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] → float32 (x/255 − mean)/std, memory format kept.

    mean / std: 3 numbers each, or (1, 3, 1, 1) float32 tensors already on the images' device and ×255
    (`TargetBuilder` keeps those, so a step copies nothing to the device for them)."""
    m, s = (v if torch.is_tensor(v) else _channel_constant(v, images.device) for v in (mean, std))
    return images.float().sub_(m).div_(s)


def _channel_constant(values, device) -> torch.Tensor:
    return to_device(np.asarray(values, np.float32).reshape(1, 3, 1, 1) * np.float32(255.0), device)


class TargetBuilder:
    """Build (images float normalised (B,3,H,W), cls_target (B,C), token_target (B,T,C) | None).

    store_grid: the labeler's token grid (the loader's `store_grid`); student_grid: the student's
    (`labeler.models.token_grid(model, input_size)`), default = store grid. token_target is None
    when the batch carries no token logits (stage 1) or `tokens` is None.
    train=False: no erasing, no mixing, class target = one-hot (no smoothing).
    view_spec: the store's ViewSpec, needed for device-path batches (`source` + `params`, see
    `trainer.loader.StudentLoader`). rank: this process's rank; every draw is seeded by (seed, rank, step).
    photometric: the device path's photometric ops, to share one (and its CUDA graph) between builders.
    """

    def __init__(self, *, num_classes: int, data: DataConfig, tokens: TokenLabelConfig | None = None,
                 store_grid: tuple[int, int] | None = None, student_grid: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu", seed: int | None = None, train: bool = True,
                 view_spec=None, rank: int = 0, photometric: PhotometricGraph | None = None):
        self.num_classes, self.data, self.tokens, self.train = int(num_classes), data, tokens, train
        self.view_spec, self.rank = view_spec, int(rank)
        self.store_grid = tuple(store_grid) if store_grid is not None else None
        self.student_grid = tuple(student_grid) if student_grid is not None else self.store_grid
        self.device = torch.device(device)
        self.seed = int(data.seed if seed is None else seed)
        self.erase = (build_random_erasing(data.reprob, data.remode, self.device)
                      if train and data.student_augs else None)
        self.last_mix = MixParams()
        self.photometric = photometric or PhotometricGraph(graphed=data.photometric_graph)
        self._mean, self._std = (_channel_constant(v, self.device) for v in (data.mean, data.std))

    def _seeds(self, step: int) -> tuple[int, int, int]:
        return tuple(int(x) for x in np.random.SeedSequence(self.seed, spawn_key=(_STEP_TAG, self.rank, int(step)))
                     .generate_state(3, dtype=np.uint64) >> np.uint64(1))

    def render(self, batch: dict) -> torch.Tensor:
        """The batch's student views as uint8 (B, 3, h, w) on the device (rendered here for a device-path batch)."""
        if "image" in batch:
            return batch["image"].to(self.device, non_blocking=True)
        images = self.render_views(batch)
        if "photo_ops" in batch:
            images = self.photometric(images, batch["photo_ops"], batch["photo_args"])  # the graph's buffer: used
            # (normalised into a new tensor) before the next call overwrites it
        return images

    def render_views(self, batch: dict) -> torch.Tensor:
        """A device-path batch's stored views replayed, uint8 (B, 3, h, w), before the photometric slots."""
        if self.view_spec is None:
            raise ValueError("TargetBuilder got a device-path batch (source + params) but no view_spec to render it")
        sources = upload_flat(batch["source"], self.device, image_hw=batch["source_hw"].numpy(),
                              origins=batch["source_origin"].numpy())
        return render_batch(sources, np.arange(len(sources.hw)), batch["params"].numpy(), self.view_spec)

    def __call__(self, batch: dict, step: int):
        gen_seed, mix_seed, erase_seed = self._seeds(step)
        images = normalize(self.render(batch), self._mean, self._std)
        labels = batch["label"].to(self.device, non_blocking=True)
        if self.erase is not None:
            with seeded_global_random(np.random.SeedSequence(erase_seed)):  # timm erases with global `random`
                images = self.erase(images)

        token_target = None
        if self.tokens is not None and "token_logit" in batch:
            if self.store_grid is None:
                raise ValueError("TargetBuilder needs store_grid (the loader's store_grid) for token targets")
            gen = torch.Generator(device=self.device).manual_seed(gen_seed)
            logit, topk_class, tail = (batch[k].to(self.device, non_blocking=True) if k in batch else None
                                       for k in ("token_logit", "token_class", "token_tail"))
            token_target = token_targets(logit, topk_class, tail,
                                         num_classes=self.num_classes, cfg=self.tokens, src_grid=self.store_grid,
                                         dst_grid=self.student_grid, generator=gen)

        if not self.train:
            self.last_mix = MixParams()
            return images, mix_class_targets(labels, self.num_classes, self.last_mix, 0.0), token_target
        grid = self.student_grid or tuple(images.shape[-2:])  # stage 1: CutMix box in pixels
        mix = draw_mix(self.data, grid, np.random.default_rng(mix_seed))
        self.last_mix = mix
        images = mix_images(images, mix, grid, inplace=True)  # our own fresh tensors: no copies
        cls_target = mix_class_targets(labels, self.num_classes, mix, self.data.label_smoothing)
        if token_target is not None:
            token_target = mix_token_targets(token_target, mix, self.student_grid, self.tokens.token_mix, inplace=True)
        return images, cls_target, token_target
