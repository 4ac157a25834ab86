"""labeler.kernel_profile: torch.profiler's table of a few calls (the CUDA case runs on a GPU node)."""
import pytest
import torch

from labeler.kernel_profile import PROFILE_ROWS, profile_calls


def test_profile_tables_the_ops_of_the_calls():
    a = torch.randn(64, 64)
    calls = []
    table = profile_calls(lambda i: calls.append(i) or (a @ a).relu_(), 3, "cpu")
    assert calls == [0, 1, 2]
    assert "aten::mm" in table and "aten::relu_" in table and "Self CPU time total" in table
    assert len([line for line in table.splitlines() if line.strip().startswith("aten::")]) <= PROFILE_ROWS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_tables_the_kernels_on_a_gpu():
    a = torch.randn(1024, 1024, device="cuda")
    table = profile_calls(lambda i: (a @ a).relu_(), 3, "cuda")
    assert "Self CUDA" in table or "Self Device" in table or "self_device" in table.lower(), table
