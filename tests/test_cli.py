"""What both CLIs share: `python -m` entry points, one user-error exit (code 2, one `error:` line), one error
hierarchy per package, one device resolver, the explicit GPU-worker settings and `stl-labels models`."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from labeler.device import resolve_device
from labeler.errors import CheckpointError, DeviceError, LabelerError
from pipelines import cli_labels, cli_train
from pipelines.config import ConfigError
from trainer.errors import NonFiniteLoss, TrainCheckpointError, TrainConfigError, TrainerError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("module, command", [("pipelines.cli_labels", "generate"), ("pipelines.cli_train", "student")])
def test_python_dash_m_runs_the_cli_like_the_console_script(module, command):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert command in out.stdout
    bad = subprocess.run([sys.executable, "-m", module, "no-such-command"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert bad.returncode == 2 and "No such command" in bad.stderr


def test_every_user_error_is_one_line_and_exit_2_in_both_clis(tmp_path):
    preset = tmp_path / "c.yaml"
    preset.write_text("optim:\n  weight_decy: 0.1\n")
    cases = [
        (cli_train.app, ["labeler", "--shards", "a.tar", "--out", str(tmp_path / "r"), "--config", str(preset)],
         "c.yaml: unknown key optim.weight_decy"),
        (cli_train.app, ["labeler", "--shards", "a.tar", "--out", str(tmp_path / "r"), "--set", "optim.lr=-1"],
         "optim.lr must be a positive"),
        (cli_labels.app, ["info", str(tmp_path / "none.zarr")], "no label store"),
        (cli_labels.app, ["report", str(tmp_path / "none.zarr"), "--labeler", "x", "--out", str(tmp_path / "o")], "none.zarr"),
        (cli_labels.app, ["demo-data", str(tmp_path / "d"), "--size", "8"], "error: "),
        (cli_labels.app, ["shard", str(tmp_path / "missing"), str(tmp_path / "s-%06d.tar")], "missing"),
        (cli_labels.app, ["generate", "--shards", "a.tar", "--store", str(tmp_path / "l.zarr"), "--set", "views"],
         "KEY.PATH=VALUE"),
    ]
    for app, args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.output


def test_one_base_error_per_package_and_no_two_error_classes_share_a_name():
    assert issubclass(CheckpointError, LabelerError) and issubclass(DeviceError, LabelerError)
    for cls in (TrainConfigError, TrainCheckpointError, NonFiniteLoss):
        assert issubclass(cls, TrainerError)
    assert issubclass(ConfigError, ValueError)
    classes = defaultdict(list)
    for package in ("labelstore", "labeler", "trainer", "pipelines"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    classes[node.name].append(str(path.relative_to(REPO)))
    errors = {name: where for name, where in classes.items() if name.endswith(("Error", "Config", "Settings", "Spec"))}
    assert {name: where for name, where in errors.items() if len(where) > 1} == {}


def test_one_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="torch sees no CUDA device"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda:0")


def test_gpu_workers_say_which_settings_they_replace():
    from labeler.worker_settings import WorkerSettings
    from pipelines.ray_jobs import ClusterPlan, worker_settings_for

    mine = WorkerSettings(checkpoint=None, device="cpu", decode_workers=2)
    same, note = worker_settings_for(ClusterPlan(2, 0.0, 1.0), mine)
    assert same == mine and note is None  # CPU workers run as configured
    chosen, note = worker_settings_for(ClusterPlan(1, 1.0, 8.0), mine)
    assert (chosen.device, chosen.decode_workers) == ("cuda", 8)
    assert note and "device 'cpu' -> 'cuda'" in note and "decode_workers 2 -> 8" in note and "one GPU" in note
    _, note = worker_settings_for(ClusterPlan(1, 1.0, 8.0), WorkerSettings(checkpoint=None, device="cuda", decode_workers=8))
    assert note is None  # nothing changed: nothing to say
    auto, _ = worker_settings_for(ClusterPlan(3, 0.0, 2.0), WorkerSettings(checkpoint=None, decode_workers=0))
    assert auto.decode_workers == 2  # auto: the CPUs the actor holds, not every CPU of its node
    assert "16 CPU each (16 decode process(es))" in ClusterPlan(1, 1.0, 16.0).describe()
    assert "16 CPU each (16 decode process(es), 4 store writer process(es))" in ClusterPlan(1, 1.0, 16.0).describe(4)


def test_models_command_prints_grid_and_rejects_a_bad_size():
    r = runner.invoke(cli_labels.app, ["models", "--size", "64", "fan_test_p4_hybrid_token"])
    assert r.exit_code == 0, r.output
    assert "model=fan_test_p4_hybrid_token" in r.stdout and "input=64x64" in r.stdout and "grid=4x4" in r.stdout
    bad = runner.invoke(cli_labels.app, ["models", "--size", "6x4x2", "fan_test_p4_hybrid_token"])
    assert bad.exit_code == 2 and "error: --size must be S or HxW" in bad.stderr
