"""`labeler.device.to_device`: host arrays to the device without a host sync, read-only arrays included."""
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
