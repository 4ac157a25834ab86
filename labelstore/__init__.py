"""Label store: the contract between the labeling job and the trainers (numpy, zarr, numcodecs, Pillow,
braceexpand, fsspec; never torch, ray, typer or webdataset). The shard sample contract is `labelstore.shard_format`.

See docs/internals.md for the seams and docs/store-format.md for the on-disk layout.
"""
from .codec import EncodedLogits, class_id_dtype, encode_topk, topk_log_probs
from .errors import (ImageDecodeError, InvalidLabels, MissingRow, SchemaMismatch, ShardCapacityError, ShardConflict,
                     StoreCorrupt, StoreError, ViewSpecError)
from .images import decode_image, to_rgb
from .labeler_store import LabelerStore
from .row_index import RowIndex, ShardRows
from .sampling import sample_token_labels
from .schema import LabelerSpec, ShardInfo
from .store import LabelStore
from .verify import verify_store
from .views import (NUM_PARAMS, PARAM_FIELDS, ViewSpec, crop_box, draw_view_params, draw_views, reduce_factor,
                    render, render_mask, view_matrix)

__all__ = [
    "ViewSpec", "PARAM_FIELDS", "NUM_PARAMS", "draw_view_params", "draw_views", "view_matrix", "render",
    "render_mask", "crop_box", "reduce_factor",
    "LabelStore", "LabelerSpec", "ShardInfo", "LabelerStore", "RowIndex", "ShardRows",
    "EncodedLogits", "encode_topk", "topk_log_probs", "class_id_dtype",
    "sample_token_labels", "decode_image", "to_rgb",
    "StoreError", "SchemaMismatch", "MissingRow", "StoreCorrupt", "InvalidLabels", "ShardCapacityError", "ShardConflict",
    "ViewSpecError", "ImageDecodeError", "verify_store",
]
