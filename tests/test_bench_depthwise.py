"""`stl-labels bench depthwise`: its table, its argument checks, and (slow) a real run on the CPU."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from labeler.bench_depthwise import DepthwiseFigures, bench_depthwise
from pipelines.cli_labels import app


def test_the_table_gives_each_impl_and_the_stencil_over_conv_ratios():
    figures = DepthwiseFigures(model="m", device="NVIDIA H200", amp="bf16", input_size=224, batch_size=256,
                               train_batch=128, forward={"stencil": 12000.0, "conv": 9600.0},
                               train={"stencil": 2600.0, "conv": 2200.0}, compile_seconds={"stencil": 30.0, "conv": 28.0})
    out = figures.format()
    assert re.search(r"stencil +12000\.0 +2600\.0 +30\.0", out), out
    assert re.search(r"conv +9600\.0 +2200\.0 +28\.0", out), out
    assert "stencil / conv: forward 1.250, forward + backward 1.182" in out
    forward_only = DepthwiseFigures(model="m", device="cpu", amp="none", input_size=64, batch_size=4, train_batch=0,
                                    forward={"stencil": 2.0, "conv": 1.0}, compile_seconds={"stencil": 1.0, "conv": 1.0})
    assert "stencil / conv: forward 2.000\n" in forward_only.format() + "\n" and "n/a" in forward_only.format()


@pytest.mark.parametrize("kwargs, message", [(dict(amp="fp8"), "amp must be one of"),
                                             (dict(batch_size=0), "--batch-size and --batches must be >= 1")])
def test_bad_settings_are_refused_before_any_model_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_depthwise("fan_test_p4_hybrid_token", device="cpu", **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cli_measures_both_impls_on_the_cpu():
    result = CliRunner().invoke(app, ["bench", "depthwise", "--model", "fan_test_p4_hybrid_token", "--batch-size", "2",
                                      "--train-batch", "2", "--batches", "1", "--input-size", "32", "--device", "cpu",
                                      "--amp", "none"])
    assert result.exit_code == 0, result.output
    assert re.search(r"stencil +\d+\.\d +\d+\.\d", result.output) and "stencil / conv: forward" in result.output
