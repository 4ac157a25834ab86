"""`stl-train`: stage-1 labeler training, student training on stored token labels, evaluation.

Command bodies stay short and import torch inside the command so `--help` is fast.
"""
from __future__ import annotations

import contextlib
from typing import Annotated, Iterator

import typer

from pipelines.cli_errors import exit_2_on_user_error
from pipelines.cli_help import HelpCommand

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train FAN token-labelers and students; evaluate.")


@app.callback()
def main() -> None:
    """Train FAN token-labelers (stage 1) and students on stored token labels (stage 2); evaluate."""


# --- commands: student, labeler, eval, bench ---------------------------------------------------

_SHARDS_HELP = "Shard URLs or brace patterns, e.g. 'data/train-{000000..001023}.tar' (repeatable)."
_SET_HELP = "Override a setting, e.g. --set optim.lr=1e-3 (repeatable)."


# timm's train.py flags (and a few more) this CLI takes as `--set KEY=VALUE` instead.
TIMM_FLAG_KEYS = {
    "--epochs": "schedule.epochs", "--batch-size": "data.batch_size", "--lr": "optim.lr", "-b": "data.batch_size",
    "--weight-decay": "optim.weight_decay", "--warmup-epochs": "schedule.warmup_epochs",
    "--cooldown-epochs": "schedule.cooldown_epochs", "--min-lr": "schedule.min_lr", "--warmup-lr": "schedule.warmup_lr",
    "--drop-path": "model.drop_path_rate", "--smoothing": "data.label_smoothing", "--clip-grad": "optim.clip_grad",
    "--mixup": "data.mixup", "--cutmix": "data.cutmix", "--reprob": "data.reprob", "--aa": "data.rand_augment",
    "--model-ema-decay": "run.ema_decay", "--workers": "data.workers", "-j": "data.workers", "--seed": "data.seed",
    "--amp": "run.amp", "--img-size": "model.img_size", "--num-classes": "model.num_classes",
    "--log-interval": "run.log_every", "--opt": "optim.name", "--channels-last": "model.channels_last",
}


class TrainCommand(HelpCommand):
    set_keys = TIMM_FLAG_KEYS


_FROM_CONFIG = "--config's, else the built-in"
# The options both training stages take, declared once (typer reads the Annotated metadata).
Shards = Annotated[list[str], typer.Option("--shards", help=_SHARDS_HELP)]
Epochs = Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (schedule.epochs).",
                                               show_default=_FROM_CONFIG)]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, show_default=_FROM_CONFIG,
                                                  help="Images per step on each process (data.batch_size).")]
Lr = Annotated[float | None, typer.Option("--lr", show_default=_FROM_CONFIG, help=(
    "Learning rate at a global batch of optim.lr_base_batch, scaled linearly with the real one (optim.lr)."))]
Config = Annotated[str | None, typer.Option("--config", help="YAML preset, e.g. pipelines/presets/paper_small.yaml.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)]
Resume = Annotated[str | None, typer.Option("--resume", help="Continue exactly from a checkpoint (e.g. RUN/last.pth).")]


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


@contextlib.contextmanager
def _failed_run_set_aside(out: str) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves no folder that looks like a finished one."""
    from pathlib import Path

    existed = Path(out).is_dir() and any(Path(out).iterdir())
    try:
        yield
    except BaseException:
        if _is_rank0():
            from trainer.run_log import set_aside_failed_run

            moved = set_aside_failed_run(out, existed)
            if moved is not None:
                where = f"moved to {moved}" if moved != Path(out) else f"marked with {moved / 'FAILED'}"
                typer.echo(f"the run failed before its first checkpoint; its folder is {where}", err=True)
        raise


EXIT_STOPPED = 143  # 128 + SIGTERM: the run was stopped, its checkpoint written; `--resume` continues exactly


def _exit_if_stopped(result) -> None:
    """A SIGTERM'd run wrote its checkpoint; it still exits non-zero, so schedulers see it did not finish."""
    if result.status == "stopped":
        raise typer.Exit(EXIT_STOPPED)


def _is_rank0() -> bool:
    """Under torchrun every rank returns from training; only rank 0 prints the summary."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _stage_config(config: str | None, sets: list[str] | None, model: str | None, shards: list[str],
                  epochs: int | None, batch_size: int | None, lr: float | None):
    """A training stage's config (`_train_config`): preset, then the flags given (None: not given), then --set."""
    return _train_config(config, sets, model__name=model, data__shards=shards, schedule__epochs=epochs,
                         data__batch_size=batch_size, optim__lr=lr)


@app.command("student", cls=TrainCommand)
def student_cmd(
    shards: Shards,
    labels: str = typer.Option(..., "--labels", help="Label store (from `stl-labels generate`)."),
    labeler: str = typer.Option(..., "--labeler", help="Labeler name inside the store, e.g. fan_tl_s."),
    model: str = typer.Option(None, "--model", help="Student, e.g. fan_small_12_p4_hybrid_token."),
    out: str = typer.Option(..., "--out", help="Run folder: config.yaml, metrics, last.pth, model_ema.pth."),
    epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
    config: Config = None, sets: Sets = None, resume: Resume = None,
) -> None:
    """Stage 2 (paper Eq. 5): CE(cls, mixed target) + beta * mean token CE on the stored token labels."""
    with exit_2_on_user_error():
        cfg = _stage_config(config, sets, model, shards, epochs, batch_size, lr)
        from trainer.run_stage import run_student

        with _failed_run_set_aside(out):  # the run's own log ends with its one end-of-run line
            result = run_student(cfg, labels=labels, labeler=labeler, out_dir=out, resume=resume)
    _exit_if_stopped(result)


@app.command("labeler", cls=TrainCommand)
def labeler_cmd(
    shards: Shards,
    model: str = typer.Option(None, "--model", help="Token-labeler, e.g. fan_small_12_p4_hybrid_token."),
    out: str = typer.Option(..., "--out", help="Run folder; its model_ema.pth is what `stl-labels generate --checkpoint` takes."),
    epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
    config: Config = None, sets: Sets = None, resume: Resume = None,
) -> None:
    """Stage 1 (paper Eq. 2): CE(cls) + alpha * CE(mean over tokens of the token logits), full augmentation."""
    with exit_2_on_user_error():
        cfg = _stage_config(config, sets, model, shards, epochs, batch_size, lr)
        from trainer.run_stage import run_labeler

        with _failed_run_set_aside(out):
            result = run_labeler(cfg, out_dir=out, resume=resume)
    _exit_if_stopped(result)


@app.command("eval", cls=TrainCommand)
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


@app.command("bench", cls=HelpCommand)
def bench_cmd(
    shards: list[str] = typer.Option(..., "--shards", help="Shards labelled in --labels. " + _SHARDS_HELP),
    labels: str = typer.Option(..., "--labels", help="Label store holding --labeler's labels for these shards."),
    labeler: str = typer.Option(..., "--labeler", help="Labeler name inside the store."),
    model: str = typer.Option("fan_test_p4_hybrid_token", "--model", help="Student (and same-size online teacher)."),
    seconds: float = typer.Option(60.0, "--seconds", help="Timed end-to-end run per variant, after the warm-up."),
    steps: int = typer.Option(20, "--steps", help="Timed step-only steps per variant (batches in memory)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up steps (compile, worker start) per variant."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per step."),
    workers: int = typer.Option(0, "--workers", help="Data-loader workers (persistent)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    amp: str = typer.Option("none", "--amp", help="none | bf16 | fp16."),
    compile_step: bool = typer.Option(False, "--compile", help="torch.compile the student (model.compile)."),
    compile_mode: str = typer.Option("default", "--compile-mode", help="torch.compile mode with --compile: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs."),
    augment_device: str = typer.Option("auto", "--augment-device",
                                       help="auto | cpu | cuda: where views are rendered and augmented."),
    photometric_graph: bool = typer.Option(True, "--photometric-graph/--no-photometric-graph",
                                           help="On a GPU, each batch's photometric ops as one CUDA graph "
                                                "(data.photometric_graph)."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved step-only/loader repeats; the median is printed."),
    loader_seconds: float = typer.Option(10.0, "--loader-seconds", help="Each loader-alone run reads at least this long (several epochs: the workers' bursts of batches average out)."),
    profile_steps: int = typer.Option(0, "--profile-steps", help="Also profile this many step-only steps of (b) and print the top kernels (torch.profiler)."),
) -> None:
    """Student img/s end to end (real loop) and step only: (a) no token labels, (b) stored labels, (c) online
    teacher; where the time goes; loader images/s vs timm."""
    with exit_2_on_user_error():
        from trainer.bench import BenchSettings, run_bench

        figures = run_bench(BenchSettings(shards=tuple(shards), labels=labels, labeler=labeler, model=model,
                                          seconds=seconds, steps=steps, warmup=warmup, batch_size=batch_size,
                                          workers=workers, device=device, amp=amp, compile=compile_step,
                                          compile_mode=compile_mode,
                                          augment_device=augment_device, photometric_graph=photometric_graph,
                                          repeats=repeats, profile_steps=profile_steps,
                                          loader_seconds=loader_seconds),
                            report=lambda line: typer.echo(line, err=True))
    typer.echo(figures.table())


if __name__ == "__main__":
    app()
