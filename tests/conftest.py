"""Shared fixtures (keep small): tiny view/labeler specs and a store factory for label-store tests."""
from __future__ import annotations

import numpy as np
import pytest

import labelstore as L

TINY_CLASSES = 20


@pytest.fixture
def tiny_view_spec() -> "L.ViewSpec":
    return L.ViewSpec(size=(32, 32))


@pytest.fixture
def tiny_labeler_spec(tiny_view_spec) -> "L.LabelerSpec":
    """A 4x4-token, 20-class, 3-view, top-4 labeler (no model behind it)."""
    return L.LabelerSpec(name="tiny", arch="fan_test_p4_hybrid_token", num_classes=TINY_CLASSES, input_size=(32, 32),
                         grid=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3, view_spec=tiny_view_spec, views=3, topk=4)


def fake_shard(store: "L.LabelStore", spec: "L.LabelerSpec", shard_index: int, n: int | None = None,
               seed: int = 0, image_hw: tuple[int, int] = (40, 50)) -> dict:
    """Keyword arguments for LabelerStore.write_shard: random logits, real drawn view params."""
    info = store.shard(shard_index)
    n = info.num_samples if n is None else n
    rng = np.random.default_rng(seed + 1000 * shard_index)
    keys = [f"{info.url}/{j:05d}" for j in range(n)]
    params = np.stack([L.draw_views(spec.view_spec, store.seed, info.first_row + j, spec.views, image_hw)
                       for j in range(n)])
    t = spec.grid[0] * spec.grid[1]
    return dict(keys=keys, labels=rng.integers(0, spec.num_classes, n), image_hw=np.tile(image_hw, (n, 1)),
                valid=np.ones(n, bool), params=params,
                tokens=L.encode_topk(rng.normal(0, 3, (n, spec.views, t, spec.num_classes)), spec.topk),
                cls=L.encode_topk(rng.normal(0, 3, (n, spec.views, spec.num_classes)), spec.topk))


@pytest.fixture
def make_fake_shard():
    return fake_shard
