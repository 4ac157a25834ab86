"""`labeler.device.to_device` and `to_host_async`: host arrays to the device without a host sync, read-only arrays
included; device tensors back to page-locked host memory without a wait."""
import warnings

import numpy as np
import pytest
import torch

from labeler.device import to_device


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_read_only_array_is_copied_once_without_a_warning(dtype):
    host = np.arange(24, dtype=dtype).reshape(2, 4, 3)
    host.flags.writeable = False  # as np.asarray(PIL.Image) gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        t = to_device(host, "cpu")
    assert t.dtype == torch.from_numpy(np.empty(0, dtype)).dtype and tuple(t.shape) == host.shape
    assert np.array_equal(t.numpy(), host)
    assert not np.shares_memory(t.numpy(), host)


def test_writable_array_is_wrapped_on_cpu():
    host = np.arange(6, dtype=np.float32)
    assert np.shares_memory(to_device(host, "cpu").numpy(), host)  # no copy where none is needed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_read_only_array_reaches_the_gpu():
    host = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    host.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = to_device(host, "cuda")
    assert t.is_cuda and np.array_equal(t.cpu().numpy(), host)


def test_to_host_async_copies_a_host_tensor():
    from labeler.device import to_host_async

    t = torch.arange(6.0).view(2, 3)
    copy = to_host_async(t)
    t.add_(1)
    assert torch.equal(copy, torch.arange(6.0).view(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_host_async_queues_a_page_locked_copy_with_the_strides():
    from labeler.device import to_host_async

    t = torch.randn(4, 8, 5, 5, device="cuda").to(memory_format=torch.channels_last)
    want = t.cpu()
    copy = to_host_async(t)
    t.zero_()  # queued after the copy: does not reach it
    torch.cuda.synchronize()
    assert copy.is_pinned() and copy.is_contiguous(memory_format=torch.channels_last) and torch.equal(copy, want)
