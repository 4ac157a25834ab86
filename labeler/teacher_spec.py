"""What a teacher model will store: its `LabelerSpec`, and the store + labeler it writes into.

Shared by the labeling job (`stl-labels generate`) and its bench, so both label with the same spec.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from labeler.models import create_token_model, token_grid
from labeler.models.checkpoint import file_sha256, load_state, read_state, state_num_classes
from labelstore import LabelerSpec, LabelerStore, LabelStore, SchemaMismatch, StoreError, ViewSpec


def resolve_num_classes(num_classes: int | None, checkpoint: str | None, state: Mapping | None = None) -> int:
    """`num_classes` as given; else the rows of the checkpoint's classifier (from `state` when already read);
    else 1000 (random ImageNet-size head)."""
    if num_classes is not None:
        return int(num_classes)
    if not checkpoint:
        return 1000
    found = state_num_classes(state if state is not None else read_state(checkpoint))
    if found is None:
        raise ValueError(f"cannot tell the number of classes of {checkpoint} (no head, aux_head, head.fc, "
                         "classifier or fc weight in it): give --num-classes")
    return found


def build_labeler_spec(*, name: str, model: str, num_classes: int | None, views: int, topk: int,
                       checkpoint: str | None = None, input_size: Sequence[int] | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       view: Mapping[str, Any] | None = None) -> LabelerSpec:
    """The LabelerSpec of teacher `model`; builds the model on CPU (grid, mean/std, checkpoint check).

    Unset input size, mean and std come from the model's pretrained config; `view` holds ViewSpec fields;
    `num_classes=None` reads the class count off the checkpoint (`resolve_num_classes`).
    """
    state = read_state(checkpoint) if checkpoint else None  # read once: class count and weights
    num_classes = resolve_num_classes(num_classes, checkpoint, state)
    if topk > num_classes:
        raise ValueError(f"topk {topk} exceeds the teacher's {num_classes} classes")
    net = create_token_model(model, num_classes=num_classes, pretrained=False)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    size = tuple(input_size or cfg.get("input_size", (3, 224, 224))[1:])
    sha = ""
    if checkpoint:
        load_state(net, state, checkpoint)
        sha = file_sha256(checkpoint)
    return LabelerSpec(
        name=name, arch=model, num_classes=num_classes, input_size=size,
        grid=token_grid(net, size), mean=tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(std or cfg.get("std", (0.229, 0.224, 0.225))),
        view_spec=ViewSpec(size=size, **dict(view or {})), views=views, topk=topk,
        checkpoint_sha256=sha)


def open_labeler_store(path: str, *, seed: int, rows_per_chunk: int,
                       spec: LabelerSpec) -> tuple[LabelStore, LabelerStore]:
    """Create or open the store and the labeler; SchemaMismatch (a readable diff) when they differ.

    `rows_per_chunk` only applies to a new store; an existing store keeps its own.
    """
    try:
        store = LabelStore.create(path, seed=seed, rows_per_chunk=rows_per_chunk)
    except StoreError:
        store = LabelStore.open(path, mode="r+")
        if store.seed != seed:
            raise SchemaMismatch(f"{path}: existing store differs:\n  seed: store has {store.seed}, "
                                 f"expected {seed}") from None
    return store, store.add_labeler(spec)
