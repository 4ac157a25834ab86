"""`stl-labels`: build, inspect and benchmark label stores.

Command bodies stay short (load config → apply overrides → validate → call the library) and import
heavy modules (torch, ray) inside the command, so `stl-labels --help` stays fast and loads no Ray.
"""
from __future__ import annotations

import signal

import typer

from pipelines.cli_errors import exit_2_on_user_error
from pipelines.cli_help import HelpCommand

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

@app.command("info", cls=HelpCommand)
def info_cmd(
    store: str = typer.Argument(..., help="Label store path (labels.zarr) or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
    invalid: int = typer.Option(10, "--invalid", min=0, help="Invalid rows (key, shard, reason) to list per labeler."),
    all_invalid: bool = typer.Option(False, "--all-invalid", help="List every invalid row."),
) -> None:
    """Labelers, settings, shards done/total, rows and bytes per view on disk, and the invalid rows."""
    import json

    from labelstore.store_report import format_info, store_info

    with exit_2_on_user_error():
        facts = store_info(store, max_invalid=None if all_invalid else invalid)
    typer.echo(json.dumps(facts, indent=2) if as_json else format_info(facts))


@app.command("verify", cls=HelpCommand)
def verify_cmd(
    store: str = typer.Argument(..., help="Label store path (labels.zarr) or URL."),
    labeler: str = typer.Option(None, "--labeler", "-l", help="Check only this labeler."),
    repair: bool = typer.Option(False, "--repair", help="Mark damaged shards not done, so the next generate relabels them."),
) -> None:
    """Check every chunk of every done shard (missing or damaged chunks, NaN/inf, class ids, view params) and the
    sample index; exit 1 on any problem."""
    from labelstore.store_report import verify_report

    with exit_2_on_user_error():
        text, ok = verify_report(store, labeler, repair=repair)
    typer.echo(text)
    if not ok:
        raise typer.Exit(1)


@bench_app.command("store", cls=HelpCommand)
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
    fidelity_views: int = typer.Option(48, "--fidelity-views", help="Teacher views (448 px, 14x14 tokens) of the token-label fidelity table; 0 skips it."),
    fidelity_ks: str = typer.Option("1,5,10,20", "--fidelity-ks", help="Comma-separated K values of the fidelity table."),
) -> None:
    """Token-label fidelity (TV per token vs the teacher's softmax) and bytes per view, then bytes on disk,
    write MB/s and read views/s (chunk-sequential and random) for each K."""
    from labeler.bench_store import StoreBenchConfig, run_store_bench

    cfg = StoreBenchConfig(out=out, rows=rows, dense_rows=dense_rows, views=views, rows_per_chunk=rows_per_chunk,
                           ks=tuple(int(k) for k in ks.split(",") if k.strip()), logits=logits,
                           unique_views=unique_views, random_reads=random_reads, seed=seed, fidelity_views=fidelity_views,
                           fidelity_ks=tuple(int(k) for k in fidelity_ks.split(",") if k.strip()))
    run_store_bench(cfg, echo=typer.echo)


# --- labeling job: generate, shard, bench generate --------------------------------------------

@bench_app.command("generate", cls=HelpCommand)
def bench_generate_cmd(
    shards: list[str] = typer.Option(..., "--shards", help="Shard URLs or brace patterns to label (repeatable)."),
    model: str = typer.Option("fan_tiny_8_p4_hybrid_token", "--model", help="Teacher architecture (random weights unless --checkpoint)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Optional teacher weights."),
    batch_size: int = typer.Option(256, "--batch-size", help="Views per forward pass (whole images of S views)."),
    amp: str = typer.Option("bf16", "--amp", help="none | bf16 | fp16."),
    views: int = typer.Option(32, "--views", help="Views per sample S."),
    topk: int = typer.Option(10, "--topk", help="Top-k kept per token."),
    num_classes: int = typer.Option(None, "--num-classes", help="Teacher classes (default: the checkpoint's; 1000 for random weights)."),
    input_size: int = typer.Option(None, "--input-size", help="Square input size (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i]."),
    render_backend: str = typer.Option("auto", "--render-backend", help="auto (torch on GPU, Pillow on CPU) | torch | pillow."),
    decode_workers: int = typer.Option(0, "--decode-workers", help="Decode workers (0 = one per CPU)."),
    decode_pool: str = typer.Option("auto", "--decode-pool", help="auto (processes on GPU, threads on CPU) | process | thread."),
    shards_in_flight: int = typer.Option(0, "--shards-in-flight", help="Shards labelled at once (0 = automatic)."),
    compile: str = typer.Option("auto", "--compile", help="torch.compile the teacher: auto (on CUDA) | true | false."),
    cuda_graph: str = typer.Option("auto", "--cuda-graph", help="Run each batch's forward + top-k as one captured CUDA graph: auto (on CUDA) | true | false."),
    channels_last: str = typer.Option("auto", "--channels-last", help="The teacher's weights and input in channels-last memory: auto (on CUDA) | true | false."),
    decode_device: str = typer.Option("cpu", "--decode-device", help="cpu (Pillow) | cuda (nvJPEG, see bench jpeg)."),
    keep_store: str = typer.Option(None, "--keep-store", help="Keep the labels in this store (labeler 'bench') instead of a scratch one."),
    store_writers: int = typer.Option(-1, "--store-writers", help="Processes writing the shards (-1 = 4 with decode processes, 0 = in the shard's thread)."),
    forward_batches: int = typer.Option(0, "--forward-batches", help="Batches per bare-forward figure (0 = as many as the pipeline ran)."),
    profile_batches: int = typer.Option(0, "--profile-batches", help="Also print torch.profiler's top kernels of this many teacher batches."),
    passes: int = typer.Option(2, "--passes", help="Label the shards this many times; the last pass is measured, earlier ones (one-off costs: compiles, page-locked buffers) get a line each."),
) -> None:
    """Views/s of the labeling pipeline vs the bare forward (eager, compiled), TFLOP/s, and where the time went."""
    from labeler.bench_generate import bench_generate

    with exit_2_on_user_error():
        report = bench_generate(shards, model, batch_size, amp, views, topk=topk, num_classes=num_classes,
                                input_size=input_size, device=device, render_backend=render_backend,
                                decode_workers=decode_workers, checkpoint=checkpoint, compile=compile,
                                cuda_graph=cuda_graph, channels_last=channels_last,
                                decode_device=decode_device, decode_pool=decode_pool,
                                shards_in_flight=shards_in_flight, keep_store=keep_store,
                                forward_batches=forward_batches or None, store_writers=store_writers,
                                profile_batches=profile_batches, passes=passes,
                                report=lambda line: typer.echo(line, err=True))
    typer.echo(report.format())


@bench_app.command("shards", cls=HelpCommand)
def bench_shards_cmd(
    out: str = typer.Argument(..., help="Output folder (gets bench-000000.tar, ...)."),
    shards: int = typer.Option(8, "--shards", help="Number of shards."),
    per_shard: int = typer.Option(500, "--per-shard", help="JPEGs per shard."),
    min_size: int = typer.Option(300, "--min-size", help="Smallest image side in pixels."),
    max_size: int = typer.Option(640, "--max-size", help="Largest image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed of crops, sizes and labels."),
) -> None:
    """Write shards of real-looking JPEGs (random crops of scikit-image photos) for `bench generate`."""
    from labeler.bench_shards import make_bench_shards

    with exit_2_on_user_error():
        paths = make_bench_shards(out, shards, per_shard, min_size, max_size, seed)
    typer.echo(f"wrote {len(paths)} shards × {per_shard} JPEGs ({min_size}–{max_size} px): "
               f"{paths[0]} … {paths[-1]}")


@bench_app.command("jpeg", cls=HelpCommand)
def bench_jpeg_cmd(
    shards: list[str] = typer.Option(..., "--shards", help="Shard URLs or brace patterns (JPEGs are compared)."),
    model: str = typer.Option("fan_tiny_8_p4_hybrid_token", "--model", help="Teacher architecture (random weights unless --checkpoint)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Optional teacher weights."),
    num_classes: int = typer.Option(None, "--num-classes", help="Teacher classes (default: the checkpoint's; 1000)."),
    views: int = typer.Option(4, "--views", help="Views rendered per image for the top-1 agreement."),
    limit: int = typer.Option(512, "--limit", help="JPEGs to compare."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i] (cuda = nvJPEG)."),
    amp: str = typer.Option("bf16", "--amp", help="none | bf16 | fp16."),
) -> None:
    """GPU (nvJPEG) vs Pillow decode: pixel |Δ| and the teacher's top-1 agreement on the same views."""
    from labeler.bench_jpeg import bench_jpeg

    with exit_2_on_user_error():
        report = bench_jpeg(shards, model, num_classes, checkpoint, views, limit, device=device, amp=amp)
    typer.echo(report.format())


@bench_app.command("depthwise", cls=HelpCommand)
def bench_depthwise_cmd(
    model: str = typer.Option("fan_small_12_p4_hybrid_token", "--model", help="FAN architecture (random weights)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Views per forward batch."),
    train_batch: int = typer.Option(0, "--train-batch", help="Also time a compiled forward + backward of this many images (0 = no)."),
    batches: int = typer.Option(20, "--batches", help="Timed calls per figure."),
    input_size: int = typer.Option(224, "--input-size", help="Input side in pixels."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i]."),
    amp: str = typer.Option("bf16", "--amp", help="none | bf16 | fp16."),
) -> None:
    """The FAN depthwise branch compiled as fused stencils (the default) vs the depthwise convolutions (cuDNN's on a GPU)."""
    from labeler.bench_depthwise import bench_depthwise

    with exit_2_on_user_error():
        figures = bench_depthwise(model, batch_size, amp, input_size, device, batches, train_batch)
    typer.echo(figures.format())


# Defaults of GenerateSettings, shown in --help; a flag overrides a --config preset only when typed
# (tests/test_cli.py checks these against GenerateSettings).
GENERATE_DEFAULTS = {"views": 32, "topk": 10, "seed": 0, "batch_size": 256, "amp": "bf16"}
RANDOM_TEACHER_WARNING = ("WARNING: no --checkpoint: the teacher has RANDOM weights; its token labels are noise "
                          "(use this only to test the pipeline)")


def _typed(ctx: typer.Context, flags: dict) -> dict:
    """The flags the user typed (a default must not override a --config preset's value)."""
    from typer._click.core import ParameterSource

    return {k: v for k, v in flags.items()
            if v is not None and ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}


@app.command("generate", cls=HelpCommand)
def generate_cmd(
    ctx: typer.Context,
    shards: list[str] = typer.Option(..., "--shards", help="Shard URLs or brace patterns, e.g. 'data/train-{000000..001023}.tar' (repeatable)."),
    store: str = typer.Option(..., "--store", help="Label store path or URL (created if missing)."),
    name: str = typer.Option(None, "--name", help="Labeler name inside the store, e.g. fan_tl_s.", show_default="--config's"),
    model: str = typer.Option(None, "--model", help="timm/labeler.models name, e.g. fan_small_12_p4_hybrid_token.", show_default="--config's"),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Teacher weights (EMA weights preferred); required unless --random-weights."),
    random_weights: bool = typer.Option(False, "--random-weights/--no-random-weights", help="Label without --checkpoint, with a randomly initialised teacher (pipeline tests only)."),
    num_classes: int = typer.Option(None, "--num-classes", help="Classes of the teacher.", show_default="the checkpoint's classifier rows; 1000 for random weights"),
    views: int = typer.Option(GENERATE_DEFAULTS["views"], "--views", help="Views per sample S."),
    topk: int = typer.Option(GENERATE_DEFAULTS["topk"], "--topk", help="Top-k logits kept per token (0 = dense)."),
    seed: int = typer.Option(GENERATE_DEFAULTS["seed"], "--seed", help="Store seed of the view params."),
    config: str = typer.Option(None, "--config", help="YAML preset with any generate setting, e.g. pipelines/presets/generate_small.yaml."),
    sets: list[str] = typer.Option(None, "--set", help="Override a setting, e.g. --set view.scale=[0.35,1] (repeatable)."),
    address: str = typer.Option(None, "--address", help="Ray cluster: 'auto' or 'ray://host:port'.", show_default="local Ray"),
    batch_size: int = typer.Option(GENERATE_DEFAULTS["batch_size"], "--batch-size", help="Views per teacher forward."),
    amp: str = typer.Option(GENERATE_DEFAULTS["amp"], "--amp", help="none | bf16 | fp16."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the teacher.",
                                 show_default="on CUDA workers only"),
) -> None:
    """Label every shard not yet done (resumable; safe to re-run after a crash or Ctrl-C).

    A value typed on the command line wins over --config's; --set wins over both.
    """
    from pipelines.config import load_config
    from pipelines.generate import GenerateSettings, run_with_progress

    flags = {"shards": shards or None, "store": store, "name": name, "model": model, "checkpoint": checkpoint,
             "num_classes": num_classes, "views": views, "topk": topk, "seed": seed, "address": address,
             "batch_size": batch_size, "amp": amp, "compile": compile}
    with exit_2_on_user_error():  # SchemaMismatch prints its diff
        settings = load_config(GenerateSettings, config, sets or [], _typed(ctx, flags))
        if not settings.checkpoint and not random_weights:
            raise ValueError("generate: no --checkpoint given; the teacher would label with random weights. "
                             "Give --checkpoint RUN/model_ema.pth, or --random-weights to do that on purpose")
        if not settings.checkpoint:
            typer.echo(RANDOM_TEACHER_WARNING, err=True)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop: the same clean exit as Ctrl-C
        try:
            result = run_with_progress(settings)
        except KeyboardInterrupt as e:  # Ray was shut down on the way out; nothing finished is lost
            typer.echo(str(e) if str(e) else "interrupted; run the same command again to resume "
                       "(finished shards are kept)", err=True)
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    typer.echo(result.summary())
    if not settings.checkpoint:
        typer.echo(RANDOM_TEACHER_WARNING, err=True)  # again at the end: the start scrolled away
    for url, why in result.failed:
        typer.echo(f"failed: {url}: {why}", err=True)
    if not result.ok:
        typer.echo("some shards failed; fix them and run the same command again to retry only those", err=True)
        raise typer.Exit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command("shard", cls=HelpCommand)
def shard_cmd(
    image_folder: str = typer.Argument(..., help="ImageFolder root (<root>/<class>/<image>) or existing shards, e.g. 'in-{0000..0009}.tar'."),
    out_pattern: str = typer.Argument(..., help="Output shard names with a %-index, e.g. 'shards/train-%06d.tar'."),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard", "-n", help="Samples per output shard."),
    shuffle_seed: int = typer.Option(0, "--shuffle-seed", help="Seed that mixes classes across shards."),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="Keep sorted key order."),
) -> None:
    """Turn an ImageFolder tree (or jpg+cls shards) into WebDataset shards; writes classes.txt beside them."""
    from labelstore.shard_writer import shard_dataset

    with exit_2_on_user_error():
        report = shard_dataset(image_folder, out_pattern, samples_per_shard, None if no_shuffle else shuffle_seed)
    for line in report.skipped:
        typer.echo(f"skipped {line}", err=True)
    classes = f", {len(report.classes)} classes in classes.txt" if report.classes else ""
    typer.echo(f"wrote {report.num_samples} samples in {len(report.shards)} shards "
               f"({report.shards[0]} .. {report.shards[-1]}){classes}; skipped {len(report.skipped)}")


# --- demo and quality: demo-data, report -------------------------------------------------------

@app.command("demo-data", cls=HelpCommand)
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
    with exit_2_on_user_error():
        spec = DemoDataSpec(seed=seed, image_size=size, num_train=train, num_val=val,
                            num_val_corrupt=val_corrupt if names else 0, corruptions=names,
                            samples_per_shard=per_shard, colors=colors)
        write_demo_data(out, spec, progress=typer.echo)
    typer.echo(f"wrote {out}/dataset.json (classes: {out}/classes.txt)")


@app.command("report", cls=HelpCommand)
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
    from pipelines.report import ReportConfig, build_report

    with exit_2_on_user_error():
        cfg = ReportConfig(store=store, labeler=labeler, out=out, masks=tuple(masks), samples=samples,
                           max_rows=max_rows, classes_file=classes, softmax_threshold=threshold, seed=seed)
        r = build_report(cfg, progress=typer.echo)
    m = r.get("masks")
    typer.echo(f"token top-1 = image class: {r['top1_is_image_class']:.1%}; Gumbel differs from argmax: "
               f"{r['gumbel_changes_argmax']:.1%}" + (f"; foreground IoU (argmax): {m['argmax']['iou']:.3f}" if m else ""))


@app.command("demo-photos", cls=HelpCommand)
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

    with exit_2_on_user_error():
        cfg = PhotoLabelingConfig(out=out, photos=tuple(p.strip() for p in photos.split(",") if p.strip()),
                                  views=views, topk=topk, samples=samples)
        r = label_photos(cfg, progress=typer.echo)
    typer.echo(f"open {r['report_dir']}/index.html")


@app.command("demo", cls=HelpCommand)
def demo_cmd(
    out: str = typer.Option("demo_out", "--out", help="Output directory (a rerun continues where it stopped)."),
    fast: bool = typer.Option(False, "--fast", help="CI variant: few images, a few steps per training run (~2-3 min)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete --out first instead of continuing."),
    train: int = typer.Option(None, "--train", help="Training images."),
    labeler_epochs: int = typer.Option(None, "--labeler-epochs", help="Epochs of the stage-1 labeler."),
    student_epochs: int = typer.Option(None, "--student-epochs", help="Epochs of each student."),
    views: int = typer.Option(None, "--views", help="Views per image in the label store."),
    seed: int = typer.Option(None, "--seed", help="Dataset seed."),
) -> None:
    """The whole STL loop on a laptop CPU, measured end to end (`make demo`; also `python -m pipelines.demo`)."""
    from pipelines.demo.run import demo_settings, run_demo

    with exit_2_on_user_error():
        settings = demo_settings(out, fast=fast, num_train=train, labeler_epochs=labeler_epochs,
                                 student_epochs=student_epochs, views=views, seed=seed)
    code = run_demo(settings, fresh=fresh)
    if code:
        raise typer.Exit(code)


# --- models -------------------------------------------------------------------------------------

@app.command("models", cls=HelpCommand)
def models_cmd(
    names: list[str] = typer.Argument(..., help="FAN *_token names or any timm model name."),
    size: str = typer.Option("224", "--size", help="Input size: S (square) or HxW, e.g. 96x80."),
    time: bool = typer.Option(False, "--time", help="Also measure forward and train-step time (median)."),
    batch: int = typer.Option(8, "--batch", min=1, help="Batch for --time."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repeats for --time."),
) -> None:
    """What a token model produces at an input size: parameters, token grid, prefix tokens, head mode."""
    try:
        sides = [int(v) for v in size.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) < 1:
        typer.echo(f"error: --size must be S or HxW, got {size!r}", err=True)
        raise typer.Exit(2)
    import torch

    from labeler.models.describe import describe, measure

    hw = (sides[0], sides[-1])
    typer.echo(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in names:
        with exit_2_on_user_error():
            row = describe(name, hw)
            if time:
                timings = measure(name, hw, batch, repeats)
                row.update(batch=batch, **{k: f"{v:.4f}" for k, v in timings.items()})
        typer.echo("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    app()
