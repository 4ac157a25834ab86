"""`stl-labels`: build, inspect and benchmark label stores.

Command bodies stay short (load config → apply overrides → validate → call the library) and import
heavy modules (torch, ray) inside the command, so `stl-labels --help` stays fast and loads no Ray.
"""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Offline STL token labels: build and inspect label stores.")
bench_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Benchmarks that print measured figures.")
app.add_typer(bench_app, name="bench")


@app.callback()
def main() -> None:
    """Offline STL token labels: generate, inspect and verify label stores."""


@bench_app.callback()
def bench_main() -> None:
    """Benchmarks (they print figures; nothing is asserted)."""


# --- store inspection: info, verify, bench store ----------------------------------------------

@app.command("info")
def info_cmd(
    store: str = typer.Argument(..., help="Label store path (labels.zarr) or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
) -> None:
    """Labelers, settings, shards done/total, rows and bytes per view on disk."""
    import json

    from labelstore import StoreError
    from labelstore.store_report import format_info, store_info

    try:
        facts = store_info(store)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(facts, indent=2) if as_json else format_info(facts))


@app.command("verify")
def verify_cmd(
    store: str = typer.Argument(..., help="Label store path (labels.zarr) or URL."),
    labeler: str = typer.Option(None, "--labeler", "-l", help="Check only this labeler."),
) -> None:
    """Check shapes, done mask vs data, NaN/inf, class ids, view params and the sample index; exit 1 on any problem."""
    from labelstore.store_report import verify_report

    text, ok = verify_report(store, labeler)
    typer.echo(text)
    if not ok:
        raise typer.Exit(1)


@bench_app.command("store")
def bench_store_cmd(
    out: str = typer.Option(None, "--out", help="Scratch directory for the bench stores (default: a temp dir, removed)."),
    rows: int = typer.Option(1024, "--rows", help="Rows per top-k store (multiple of --rows-per-chunk)."),
    dense_rows: int = typer.Option(256, "--dense-rows", help="Rows of the dense (K=0) store."),
    views: int = typer.Option(4, "--views", help="Views per row (S)."),
    rows_per_chunk: int = typer.Option(256, "--rows-per-chunk", help="Write unit / row chunk."),
    ks: str = typer.Option("1,5,10,0", "--ks", help="Comma-separated K values; 0 = dense float16."),
    logits: str = typer.Option("teacher", "--logits", help="teacher (EfficientNet-Lite0 CAM on skimage photos) or random."),
    unique_views: int = typer.Option(256, "--unique-views", help="Distinct teacher views to compute (tiled over rows)."),
    random_reads: int = typer.Option(200, "--random-reads", help="Single-view random reads per store."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Bytes per view on disk, write MB/s and read views/s (chunk-sequential and random) for each K."""
    from labeler.bench_store import StoreBenchConfig, run_store_bench

    cfg = StoreBenchConfig(out=out, rows=rows, dense_rows=dense_rows, views=views, rows_per_chunk=rows_per_chunk,
                           ks=tuple(int(k) for k in ks.split(",") if k.strip()), logits=logits,
                           unique_views=unique_views, random_reads=random_reads, seed=seed)
    run_store_bench(cfg, echo=typer.echo)


# --- labeling job: generate, shard, bench generate --------------------------------------------

@bench_app.command("generate")
def bench_generate_cmd(
    shards: list[str] = typer.Option(..., "--shards", help="Shard URLs or brace patterns to label (repeatable)."),
    model: str = typer.Option("fan_tiny_8_p4_hybrid_token", "--model", help="Teacher architecture (random weights unless --checkpoint)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Optional teacher weights."),
    batch_size: int = typer.Option(256, "--batch-size", help="Views per forward pass."),
    amp: str = typer.Option("bf16", "--amp", help="none | bf16 | fp16."),
    views: int = typer.Option(32, "--views", help="Views per sample S."),
    topk: int = typer.Option(10, "--topk", help="Top-k kept per token."),
    num_classes: int = typer.Option(1000, "--num-classes", help="Teacher classes."),
    input_size: int = typer.Option(None, "--input-size", help="Square input size (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i]."),
    render_backend: str = typer.Option("auto", "--render-backend", help="auto | torch | pillow."),
    decode_threads: int = typer.Option(2, "--decode-threads", help="Prefetch threads for decode and render."),
) -> None:
    """Views/s of the whole labeling pipeline vs the bare teacher forward, and the time per stage."""
    from labeler.bench_generate import bench_generate

    try:
        report = bench_generate(shards, model, batch_size, amp, views, topk, num_classes, input_size, device,
                                render_backend, decode_threads, checkpoint)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(report.format())


@app.command("generate")
def generate_cmd(
    shards: list[str] = typer.Option(None, "--shards", help="Shard URLs or brace patterns, e.g. 'data/train-{000000..001023}.tar' (repeatable)."),
    store: str = typer.Option(None, "--store", help="Label store path or URL (created if missing)."),
    name: str = typer.Option(None, "--name", help="Labeler name inside the store, e.g. fan_tl_s."),
    model: str = typer.Option(None, "--model", help="timm/labeler.models name, e.g. fan_small_12_p4_hybrid_token."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Teacher weights (EMA weights preferred)."),
    num_classes: int = typer.Option(None, "--num-classes", help="Classes of the teacher (default 1000)."),
    views: int = typer.Option(None, "--views", help="Views per sample S (default 32)."),
    topk: int = typer.Option(None, "--topk", help="Top-k logits kept per token (0 = dense; default 10)."),
    seed: int = typer.Option(None, "--seed", help="Store seed of the view params (default 0)."),
    config: str = typer.Option(None, "--config", help="YAML preset with any generate setting."),
    sets: list[str] = typer.Option(None, "--set", help="Override a setting, e.g. --set view.scale=[0.35,1] (repeatable)."),
    address: str = typer.Option(None, "--address", help="Ray cluster: 'auto' or 'ray://host:port' (default: local Ray)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Views per teacher forward (default 256)."),
    amp: str = typer.Option(None, "--amp", help="none | bf16 | fp16 (default bf16)."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the teacher."),
) -> None:
    """Label every shard not yet done (resumable; safe to re-run after a crash or Ctrl-C)."""
    from labelstore import StoreError
    from pipelines.config_overrides import ConfigError, load_config, merge
    from pipelines.generate import default_config, run_with_progress, settings_from_config

    flags = {"shards": shards or None, "store": store, "name": name, "model": model, "checkpoint": checkpoint,
             "num_classes": num_classes, "views": views, "topk": topk, "seed": seed, "address": address,
             "batch_size": batch_size, "amp": amp, "compile": compile}
    try:
        cfg = load_config(default_config(), config)
        cfg = merge(cfg, {k: v for k, v in flags.items() if v is not None}, source="command line")
        settings = settings_from_config(load_config(cfg, None, sets or []))
        result = run_with_progress(settings)
    except (ConfigError, StoreError, ValueError, OSError) as e:  # SchemaMismatch prints its diff
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(result.summary())
    for url, why in result.failed:
        typer.echo(f"failed: {url}: {why}", err=True)
    if not result.ok:
        typer.echo("some shards failed; fix them and run the same command again to retry only those", err=True)
        raise typer.Exit(1)


@app.command("shard")
def shard_cmd(
    image_folder: str = typer.Argument(..., help="ImageFolder root (<root>/<class>/<image>) or existing shards, e.g. 'in-{0000..0009}.tar'."),
    out_pattern: str = typer.Argument(..., help="Output shard names with a %-index, e.g. 'shards/train-%06d.tar'."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", "-n", help="Samples per output shard."),
    shuffle_seed: int = typer.Option(0, "--shuffle-seed", help="Seed that mixes classes across shards."),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="Keep sorted key order."),
) -> None:
    """Turn an ImageFolder tree (or jpg+cls shards) into WebDataset shards; writes classes.txt beside them."""
    from labelstore.shard_writer import shard_dataset

    try:
        report = shard_dataset(image_folder, out_pattern, samples_per_shard, None if no_shuffle else shuffle_seed)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for line in report.skipped:
        typer.echo(f"skipped {line}", err=True)
    classes = f", {len(report.classes)} classes in classes.txt" if report.classes else ""
    typer.echo(f"wrote {report.num_samples} samples in {len(report.shards)} shards "
               f"({report.shards[0]} .. {report.shards[-1]}){classes}; skipped {len(report.skipped)}")


# --- demo and quality: demo-data, report -------------------------------------------------------

@app.command("demo-data")
def demo_data(
    out: str = typer.Argument(..., help="Output directory (must not hold a dataset.json yet)."),
    seed: int = typer.Option(0, help="Dataset seed: same seed and settings give identical samples."),
    size: int = typer.Option(64, help="Image side in pixels (32..128)."),
    train: int = typer.Option(4000, help="Number of training images."),
    val: int = typer.Option(1000, help="Number of validation images."),
    val_corrupt: int = typer.Option(500, "--val-corrupt", help="First N val images get corrupted copies (0 = none)."),
    corruptions: str = typer.Option("all", help="Comma-separated corruption names, 'all' or 'none'."),
    per_shard: int = typer.Option(500, "--per-shard", help="Samples per WebDataset shard."),
    colors: str = typer.Option("random", "--colors", help="random (class = shape only) | class (each class its own hue band: easier)."),
) -> None:
    """Write the built-in demo dataset: 10 shape classes on real-photo backgrounds, with object masks."""
    from pipelines.demo.corruptions import CORRUPTIONS
    from pipelines.demo.data import DemoDataSpec, write_demo_data

    names = {"all": tuple(CORRUPTIONS), "none": ()}.get(corruptions)
    names = names if names is not None else tuple(c.strip() for c in corruptions.split(",") if c.strip())
    try:
        spec = DemoDataSpec(seed=seed, image_size=size, num_train=train, num_val=val,
                            num_val_corrupt=val_corrupt if names else 0, corruptions=names,
                            samples_per_shard=per_shard, colors=colors)
        write_demo_data(out, spec, progress=typer.echo)
    except (ValueError, FileExistsError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote {out}/dataset.json (classes: {out}/classes.txt)")


@app.command("report")
def report(
    store: str = typer.Argument(..., help="Label store path (labels.zarr)."),
    labeler: str = typer.Option(..., "--labeler", help="Labeler name inside the store."),
    out: str = typer.Option(..., "--out", help="Output directory for index.html, report.json and PNGs."),
    masks: list[str] = typer.Option([], "--masks", help="Shards with a `mask` PNG per key (brace patterns ok); repeatable."),
    samples: int = typer.Option(8, "--samples", help="Number of (image, view) pictures to draw."),
    max_rows: int = typer.Option(2000, "--max-rows", help="Measure at most this many images (spread evenly)."),
    classes: str = typer.Option(None, "--classes", help="Class names file, one per line (default: ImageNet names for 1000 classes)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Softmax threshold: a token is foreground when P(image class) >= this."),
    seed: int = typer.Option(0, "--seed", help="Seed of the Gumbel draws."),
) -> None:
    """Token-label quality of one labeler: numbers, histograms, per-sample pictures and index.html."""
    from labelstore import StoreError
    from pipelines.report import ReportConfig, build_report

    try:
        cfg = ReportConfig(store=store, labeler=labeler, out=out, masks=tuple(masks), samples=samples,
                           max_rows=max_rows, classes_file=classes, softmax_threshold=threshold, seed=seed)
        r = build_report(cfg, progress=typer.echo)
    except (ValueError, FileNotFoundError, StoreError) as exc:
        typer.echo(f"report: {exc}", err=True)
        raise typer.Exit(2) from exc
    m = r.get("masks")
    typer.echo(f"token top-1 = image class: {r['top1_is_image_class']:.1%}; Gumbel differs from argmax: "
               f"{r['gumbel_changes_argmax']:.1%}" + (f"; foreground IoU (argmax): {m['argmax']['iou']:.3f}" if m else ""))


@app.command("demo-photos")
def demo_photos(
    out: str = typer.Argument(..., help="Output directory: photos/ shard, labels.zarr, report/."),
    views: int = typer.Option(4, "--views", help="Views per photo."),
    topk: int = typer.Option(5, "--topk", help="Top-k logits stored per token."),
    samples: int = typer.Option(8, "--samples", help="Pictures in the report."),
    photos: str = typer.Option(",".join(["chelsea", "coffee", "rocket", "astronaut", "camera", "clock", "coins",
                                         "hubble_deep_field"]), "--photos", help="Comma-separated scikit-image photo names."),
) -> None:
    """Label scikit-image's photos with a real ImageNet teacher (EfficientNet-Lite0, CAM token head) and report."""
    from pipelines.demo.photos import PhotoLabelingConfig, label_photos

    try:
        cfg = PhotoLabelingConfig(out=out, photos=tuple(p.strip() for p in photos.split(",") if p.strip()),
                                  views=views, topk=topk, samples=samples)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    r = label_photos(cfg, progress=typer.echo)
    typer.echo(f"open {r['report_dir']}/index.html")
