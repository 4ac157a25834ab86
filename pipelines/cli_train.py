"""`stl-train`: stage-1 labeler training, student training on stored token labels, evaluation.

Command bodies stay short and import torch inside the command so `--help` is fast.
"""
from __future__ import annotations

import typer

from pipelines.cli_errors import exit_2_on_user_error

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train FAN token-labelers and students; evaluate.")


@app.callback()
def main() -> None:
    """Train FAN token-labelers (stage 1) and students on stored token labels (stage 2); evaluate."""


# --- commands: student, labeler, eval, bench ---------------------------------------------------

_SHARDS_HELP = "Shard URLs or brace patterns, e.g. 'data/train-{000000..001023}.tar' (repeatable)."
_SET_HELP = "Override a setting, e.g. --set optim.lr=1e-3 (repeatable)."


def _train_config(config: str | None, sets: list[str] | None, **extra):
    """Preset → command-line options → --set; a ConfigError names the key and its source."""
    from pipelines.config import load_config
    from trainer.config import TrainConfig

    nested: dict = {}
    for dotted, value in extra.items():
        if value is not None:
            section, key = dotted.split("__")
            nested.setdefault(section, {})[key] = value
    return load_config(TrainConfig, config, sets or [], nested)


EXIT_STOPPED = 143  # 128 + SIGTERM: the run was stopped, its checkpoint written; `--resume` continues exactly


def _exit_if_stopped(result) -> None:
    """A SIGTERM'd run wrote its checkpoint; it still exits non-zero, so schedulers see it did not finish."""
    if result.status == "stopped":
        raise typer.Exit(EXIT_STOPPED)


def _is_rank0() -> bool:
    """Under torchrun every rank returns from training; only rank 0 prints the summary."""
    import os

    return os.environ.get("RANK", "0") == "0"


@app.command("student")
def student_cmd(
    shards: list[str] = typer.Option(..., "--shards", help=_SHARDS_HELP),
    labels: str = typer.Option(..., "--labels", help="Label store (from `stl-labels generate`)."),
    labeler: str = typer.Option(..., "--labeler", help="Labeler name inside the store, e.g. fan_tl_s."),
    model: str = typer.Option(None, "--model", help="Student, e.g. fan_small_12_p4_hybrid_token."),
    out: str = typer.Option(..., "--out", help="Run folder: config.yaml, metrics, last.pth, model_ema.pth."),
    config: str = typer.Option(None, "--config", help="YAML preset, e.g. pipelines/presets/paper_small.yaml."),
    sets: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    resume: str = typer.Option(None, "--resume", help="Continue exactly from a checkpoint (e.g. RUN/last.pth)."),
) -> None:
    """Stage 2 (paper Eq. 5): CE(cls, mixed target) + beta * mean token CE on the stored token labels."""
    with exit_2_on_user_error():
        cfg = _train_config(config, sets, model__name=model, data__shards=shards)
        from trainer.run_stage import run_student

        result = run_student(cfg, labels=labels, labeler=labeler, out_dir=out, resume=resume)
    if _is_rank0():  # under torchrun every rank returns; one line is enough
        typer.echo(f"{result.status}: epoch {result.epoch}, {result.global_update} updates, checkpoint {result.last_checkpoint}")
    _exit_if_stopped(result)


@app.command("labeler")
def labeler_cmd(
    shards: list[str] = typer.Option(..., "--shards", help=_SHARDS_HELP),
    model: str = typer.Option(None, "--model", help="Token-labeler, e.g. fan_small_12_p4_hybrid_token."),
    out: str = typer.Option(..., "--out", help="Run folder; its model_ema.pth is what `stl-labels generate --checkpoint` takes."),
    config: str = typer.Option(None, "--config", help="YAML preset, e.g. pipelines/presets/paper_small.yaml."),
    sets: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    resume: str = typer.Option(None, "--resume", help="Continue exactly from a checkpoint (e.g. RUN/last.pth)."),
) -> None:
    """Stage 1 (paper Eq. 2): CE(cls) + alpha * CE(mean over tokens of the token logits), full augmentation."""
    with exit_2_on_user_error():
        cfg = _train_config(config, sets, model__name=model, data__shards=shards)
        from trainer.run_stage import run_labeler

        result = run_labeler(cfg, out_dir=out, resume=resume)
    if _is_rank0():
        typer.echo(f"{result.status}: epoch {result.epoch}, {result.global_update} updates, export {result.export}")
    _exit_if_stopped(result)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Weights to evaluate (EMA weights when present)."),
    shards: list[str] = typer.Option(..., "--shards", help="Clean validation shards. " + _SHARDS_HELP),
    imagenet_c: str = typer.Option(None, "--imagenet-c", help="Directory of <corruption>/<severity>/*.tar shards."),
    imagenet_a: list[str] = typer.Option(None, "--imagenet-a", help="ImageNet-A shards (200-class subset)."),
    imagenet_r: list[str] = typer.Option(None, "--imagenet-r", help="ImageNet-R shards (200-class subset)."),
    subset_labels: str = typer.Option("imagenet", "--subset-labels", help="IN-A/-R labels: imagenet (0..999) | subset (0..199)."),
    model: str = typer.Option(None, "--model", help="Model name (default: the one recorded in the checkpoint)."),
    num_classes: int = typer.Option(None, "--num-classes", help="Classes (default: recorded, else 1000)."),
    config: str = typer.Option(None, "--config", help="YAML preset (data.input_size, crop_pct, mean/std, batch_size)."),
    sets: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    json_out: str = typer.Option(None, "--json", help="Write the report here as JSON."),
) -> None:
    """Top-1/top-5 (class head and token mean); ImageNet-C mCE/relative mCE, IN-A/IN-R, retention."""
    with exit_2_on_user_error():
        cfg = _train_config(config, sets)
        import dataclasses

        from trainer.distributed import init_distributed, shutdown_distributed
        from trainer.evaluate import evaluate_checkpoint

        data = cfg.data if cfg.data.input_size else dataclasses.replace(cfg.data, input_size=(cfg.model.img_size,) * 2)
        info = init_distributed(cfg.run.device)
        report = evaluate_checkpoint(checkpoint, model_name=model, num_classes=num_classes, data=data,
                                     clean_shards=shards, imagenet_c=imagenet_c, imagenet_a=imagenet_a or None,
                                     imagenet_r=imagenet_r or None, label_space=subset_labels, amp=cfg.run.amp, info=info)
        shutdown_distributed(info)
    if json_out and info.is_main:
        report.write_json(json_out)
    if info.is_main:
        typer.echo(report.table())


@app.command("bench")
def bench_cmd(
    shards: list[str] = typer.Option(..., "--shards", help="Shards labelled in --labels. " + _SHARDS_HELP),
    labels: str = typer.Option(..., "--labels", help="Label store holding --labeler's labels for these shards."),
    labeler: str = typer.Option(..., "--labeler", help="Labeler name inside the store."),
    model: str = typer.Option("fan_test_p4_hybrid_token", "--model", help="Student (and same-size online teacher)."),
    steps: int = typer.Option(20, "--steps", help="Timed training steps per variant (after 3 warm-up steps)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per step."),
    workers: int = typer.Option(0, "--workers", help="Data-loader workers for the loader comparison."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    amp: str = typer.Option("none", "--amp", help="none | bf16 | fp16."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved repeats per variant; the median is printed."),
) -> None:
    """Student steps/s: (a) no token labels, (b) stored labels, (c) online teacher; loader images/s vs timm."""
    with exit_2_on_user_error():
        from trainer.bench import BenchSettings, run_bench

        figures = run_bench(BenchSettings(shards=tuple(shards), labels=labels, labeler=labeler, model=model, steps=steps,
                                          batch_size=batch_size, workers=workers, device=device, amp=amp,
                                          repeats=repeats))
    typer.echo(figures.table())


if __name__ == "__main__":
    app()
