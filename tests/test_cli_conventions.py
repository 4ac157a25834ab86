"""What a first-time user sees: help in one convention, timm's flags mapped or hinted, readable logs off a
terminal, failed runs set aside, and one consistent throughput in generate's summary."""
from __future__ import annotations

import dataclasses
import io
import re

import pytest
from typer.testing import CliRunner

from pipelines import cli_labels, cli_train
from pipelines.config import check_keys, load_config, parse_set
from trainer.config import TrainConfig
from trainer.run_log import RunLog, set_aside_failed_run

runner = CliRunner()
WIDE = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}


def _help(app, *path) -> str:
    r = runner.invoke(app, [*path, "--help"], env=WIDE)
    assert r.exit_code == 0, r.output
    return r.output


def _all_commands():
    for app, group in ((cli_labels.app, []), (cli_labels.bench_app, ["bench"]), (cli_train.app, [])):
        for info in app.registered_commands:
            yield (cli_labels.app if group else app), [*group, info.name]


@pytest.mark.parametrize("app, path", list(_all_commands()), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_help_uses_one_convention_no_braces_no_bool(app, path):
    text = _help(app, *path)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert not re.search(r"\{[a-z_]+\}", usage), usage  # `STORE`, not `{store}`
    assert "<bool>" not in text and "<str>" not in text and "<int>" not in text, text


def test_generate_help_marks_required_and_shows_defaults_like_the_others():
    text = _help(cli_labels.app, "generate")
    rows = {m.group(1): line for line in text.splitlines() if (m := re.search(r"(--[a-z-]+)", line))}
    assert "[required]" in rows["--shards"] + text and "*  --shards" in text and "*  --store" in text
    for flag, value in (("--views", "32"), ("--topk", "10"), ("--batch-size", "256"), ("--amp", "bf16")):
        assert f"[default: {value}]" in rows[flag], rows[flag]
    assert "--random-weights" in text


def test_generate_flag_defaults_match_the_settings_and_do_not_override_a_preset(tmp_path):
    from pipelines.generate import GenerateSettings

    fields = {f.name: f.default for f in dataclasses.fields(GenerateSettings)}
    assert {k: fields[k] for k in cli_labels.GENERATE_DEFAULTS} == cli_labels.GENERATE_DEFAULTS
    preset = tmp_path / "p.yaml"
    preset.write_text("views: 4\nname: x\nmodel: m\n")
    seen = {}

    def fake_run(settings):
        seen["settings"] = settings
        raise ValueError("stop here")

    import pipelines.generate as generate

    original = generate.run_with_progress
    generate.run_with_progress = fake_run
    try:
        r = runner.invoke(cli_labels.app, ["generate", "--shards", "a.tar", "--store", str(tmp_path / "l.zarr"),
                                           "--config", str(preset), "--random-weights", "--topk", "3"])
    finally:
        generate.run_with_progress = original
    assert r.exit_code == 2 and "stop here" in r.stderr, r.output
    assert seen["settings"].views == 4 and seen["settings"].topk == 3  # preset kept; typed flag wins
    assert "RANDOM weights" in r.stderr


def test_train_takes_epochs_batch_size_lr_onto_the_config(tmp_path, monkeypatch):
    seen = {}
    import trainer.run_stage as run_stage

    def fake(cfg, out_dir, **kw):  # like a run that wrote its config, then failed before a checkpoint
        seen["cfg"] = cfg
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "config.yaml").write_text("x")
        raise ValueError("stop here")

    monkeypatch.setattr(run_stage, "run_labeler", fake)
    r = runner.invoke(cli_train.app, ["labeler", "--shards", "a.tar", "--out", str(tmp_path / "r"), "--epochs", "5",
                                      "--batch-size", "8", "--lr", "1e-4"])
    assert r.exit_code == 2 and "stop here" in r.stderr, r.output
    cfg = seen["cfg"]
    assert (cfg.schedule.epochs, cfg.data.batch_size, cfg.optim.lr) == (5, 8, 1e-4)
    assert not (tmp_path / "r").exists() and (tmp_path / "r.failed").is_dir()  # set aside, and said so
    assert "moved to" in r.stderr and "r.failed" in r.stderr
    text = _help(cli_train.app, "student")
    assert "--epochs" in text and "--batch-size" in text and "--lr" in text


def test_a_timm_flag_the_cli_does_not_take_suggests_its_set_key():
    r = runner.invoke(cli_train.app, ["student", "--shards", "a", "--labels", "l", "--labeler", "x", "--out", "o",
                                      "--weight-decay", "0.1"], env=WIDE)
    assert r.exit_code == 2 and "--set optim.weight_decay=0.1" in r.output, r.output
    r = runner.invoke(cli_train.app, ["eval", "--checkpoint", "c", "--shards", "a", "--epochs=5"], env=WIDE)
    assert r.exit_code == 2 and "--set schedule.epochs=5" in r.output, r.output


def test_every_hinted_key_exists_in_the_train_config():
    for flag, key in cli_train.TIMM_FLAG_KEYS.items():
        check_keys(TrainConfig, parse_set(f"{key}=1"), flag)  # ConfigError if the key is not a setting
    assert load_config(TrainConfig, None, ["schedule.epochs=5"]).schedule.epochs == 5


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_one_line_per_interval_without_carriage_returns(tmp_path):
    stream = _Pipe()
    log = RunLog(tmp_path, tensorboard=False, stream=stream, log_every=10)
    for step in range(1, 26):
        log.progress(0, 2, step, 25, 1.5, 1e-3, 100.0)
    log.message("done: 1 epochs")
    log.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [re.search(r"step (\d+)/", line).group(1) for line in lines[:-1]] == ["1", "10", "20", "25"]
    assert lines[0].startswith("train: epoch 1/2 step 1/25 loss 1.5000 lr 0.001 100.0 img/s")
    assert lines[-1] == "done: 1 epochs"
    tty = _Tty()
    bar = RunLog(tmp_path, tensorboard=False, stream=tty)
    bar.progress(0, 1, 1, 2, 1.0, 1e-3, 1.0)
    bar.close()
    assert tty.getvalue().startswith("\r[") and tty.getvalue().endswith("\n")


def test_a_failed_run_folder_is_set_aside_and_a_real_one_is_kept(tmp_path):
    new = tmp_path / "run"
    new.mkdir()
    (new / "config.yaml").write_text("x")
    assert set_aside_failed_run(new, existed_before=False) == tmp_path / "run.failed"
    assert not new.exists() and (tmp_path / "run.failed" / "config.yaml").exists()
    new.mkdir()
    assert set_aside_failed_run(new, existed_before=False) == tmp_path / "run.failed.1"  # never overwrites
    mine = tmp_path / "mine"
    mine.mkdir()
    assert set_aside_failed_run(mine, existed_before=True) == mine and (mine / "FAILED").exists()
    real = tmp_path / "real"
    real.mkdir()
    (real / "last.pth").write_bytes(b"")
    assert set_aside_failed_run(real, existed_before=False) is None and real.is_dir()


def test_generate_summary_uses_one_clock_and_singular_nouns():
    from labeler.shard_outcome import ShardOutcome
    from pipelines.generate import GenerateResult

    fields = {f.name for f in dataclasses.fields(ShardOutcome)}
    values = dict(shard_index=0, url="a.tar", ok=True, views=120, num_samples=30, num_invalid=1, bytes_written=1000,
                  error=None)
    outcome = ShardOutcome(**{k: v for k, v in values.items() if k in fields})
    s = GenerateResult([outcome], {}, [], seconds=26.7, label_seconds=10.0).summary()
    assert s.startswith("labelled 1 shard (30 samples, 120 views, 1 invalid sample recorded) in 10.0 s = 12.0 views/s")
    assert "(26.7 s in all, with start-up)" in s and "0 shards failed" in s and "skipped 0 done shards" in s
