"""labeler.cuda_graph and the teacher's graphed batch: same numbers as the direct call, one shape, clear errors.
The capture tests need CUDA (docker/bench-gpu.sh runs them on a GPU node); the settings' checks run anywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labeler.cuda_graph import GraphedFunction
from labeler.models import create_token_model
from labeler.teacher import Teacher, resolve_cuda_graph
from labeler.worker_settings import WorkerSettings
from labelstore import topk_log_probs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_cuda_graph_setting_resolves_and_rejects():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_cuda_graph("auto", cpu) is False and resolve_cuda_graph("auto", gpu) is True
    assert resolve_cuda_graph(False, gpu) is False and resolve_cuda_graph("true", gpu) is True
    with pytest.raises(ValueError, match="cuda_graph true needs a CUDA device"):
        resolve_cuda_graph(True, cpu)
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        resolve_cuda_graph("sometimes", gpu)
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        WorkerSettings(checkpoint=None, cuda_graph="maybe")


def test_teacher_on_cpu_runs_without_a_graph():
    model = create_token_model("fan_test_p4_hybrid_token", num_classes=10, pretrained=False)
    teacher = Teacher(model, MEAN, STD, topk=3, device="cpu", cuda_graph="auto")
    assert teacher.graphed is None
    views = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens, cls = (c.wait() for c in teacher.encode_views_async(views))
    cls_logits, token_logits = teacher.forward(views)
    ref_tokens, ref_cls = teacher.encode(token_logits), teacher.encode(cls_logits)
    np.testing.assert_array_equal(tokens.cls, ref_tokens.cls)
    np.testing.assert_array_equal(tokens.logit, ref_tokens.logit)
    np.testing.assert_array_equal(cls.tail_lse, ref_cls.tail_lse)


def test_graphed_function_wants_a_cuda_tensor():
    with pytest.raises(ValueError, match="needs a CUDA tensor, got one on cpu"):
        GraphedFunction(lambda x: (x * 2,))(torch.zeros(2))


@cuda
def test_graphed_function_replays_with_new_inputs_and_keeps_one_shape():
    conv = torch.nn.Conv2d(3, 4, 3).cuda().eval()

    def fn(x):
        y = conv(x.float())
        return y.relu(), y.mean(dim=(1, 2, 3))

    graphed = GraphedFunction(fn)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):  # capture on the first call, replays after
            x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, device="cuda", generator=gen)
            got = [t.clone() for t in graphed(x)]
            want = fn(x)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
        assert graphed.captured and graphed.failed is None
        with pytest.raises(ValueError, match=r"captured for \(5, 3, 16, 16\).*got \(4, 3, 16, 16\)"):
            graphed(x[:4])


@cuda
def test_graphed_teacher_encodes_like_the_direct_teacher():
    torch.manual_seed(0)
    model = create_token_model("fan_test_p4_hybrid_token", num_classes=10, pretrained=False)
    graphed = Teacher(model, MEAN, STD, topk=4, device="cuda", cuda_graph=True)
    direct = Teacher(model, MEAN, STD, topk=4, device="cuda", cuda_graph=False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        views = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, device="cuda", generator=gen)
        pending = graphed.encode_views_async(views)  # copies queued before the next replay overwrites the outputs
        nxt = graphed.encode_views_async(torch.zeros_like(views))
        (tokens, cls), _ = [c.wait() for c in pending], [c.wait() for c in nxt]
        ref_tokens, ref_cls = direct(views)
        # Same maths; cuDNN may time and pick another convolution algorithm per path, so not the same last bits.
        np.testing.assert_allclose(tokens.logit.astype(np.float32), ref_tokens.logit.astype(np.float32), atol=1e-2)
        np.testing.assert_allclose(cls.logit.astype(np.float32), ref_cls.logit.astype(np.float32), atol=1e-2)
        assert (tokens.cls[..., 0] == ref_tokens.cls[..., 0]).mean() > 0.95
    assert graphed.graphed.captured


@cuda
@pytest.mark.timeout(300)
def test_the_gpu_default_teacher_compiled_graphed_channels_last_labels_like_the_eager_one():
    """What a GPU worker runs by default (compile, CUDA graph, channels-last, bf16) against the plain eager
    teacher in float32: the same top classes, top-k probabilities within bf16's error."""
    torch.manual_seed(0)
    model = create_token_model("fan_test_p4_hybrid_token", num_classes=10, pretrained=False)
    plain = Teacher(model, MEAN, STD, topk=4, device="cuda", amp="none", channels_last=False)
    fast = Teacher(model, MEAN, STD, topk=4, device="cuda", amp="bf16", compile="auto", cuda_graph="auto",
                   channels_last="auto")
    assert fast.compiled and fast.graphed is not None and fast.channels_last
    gen = torch.Generator(device="cuda").manual_seed(2)
    for _ in range(2):
        views = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device="cuda", generator=gen)
        got = [c.wait() for c in fast.encode_views_async(views)]
        want = [c.wait() for c in plain.encode_views_async(views)]
        for g, w in zip(got, want):
            assert (g.cls[..., 0] == w.cls[..., 0]).mean() > 0.9
            np.testing.assert_allclose(np.exp(topk_log_probs(g)), np.exp(topk_log_probs(w)), atol=0.03)
    assert fast.graphed.captured, fast.graphed.failed


@cuda
def test_a_function_that_syncs_cannot_be_captured_and_runs_directly():
    def fn(x):
        scale = float(x.float().mean())  # a host read: not capturable
        return (x.float() * scale,)

    graphed = GraphedFunction(fn)
    x = torch.arange(6, dtype=torch.uint8, device="cuda")
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = graphed(x)
    torch.testing.assert_close(out[0], fn(x)[0])
    assert not graphed.captured and graphed.failed
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the caller's stream, not the capture's
    torch.testing.assert_close(graphed(x)[0], fn(x)[0])  # later calls: directly, no new warning needed
    # The failed capture left the device's random generator usable (torch leaves it marked as capturing).
    assert torch.randn(64, device="cuda").isfinite().all()
    with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):  # and later captures work
        torch.randn(64, device="cuda")
