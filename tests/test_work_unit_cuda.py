"""The labeling work unit on a GPU, as a GPU worker runs it: decode processes, shards in flight, the batched
renderer, CUDA streams and events. Skipped without CUDA (docker/bench-gpu.sh runs it on a GPU node)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labeler.bench_shards import make_bench_shards
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.work_unit import ShardLabeler, build_teacher
from labeler.worker_settings import WorkerSettings
from labelstore import LabelStore
from labelstore.shard_format import count_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODEL = "fan_test_p4_hybrid_token"


def _label(tmp, shards, teacher, **settings):
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=4, topk=4)
    store, _ = open_labeler_store(str(tmp / "l.zarr"), seed=3, rows_per_chunk=8, spec=spec)
    store.register_shards([(p, count_samples(p)) for p in shards])
    base = dict(checkpoint=None, batch_size=16, amp="none", compile="false")
    with ShardLabeler(store.path, "t", WorkerSettings(**{**base, **settings}), teacher=teacher) as work:
        outcomes = list(work.label_shards(range(len(shards))))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        clock = work.clock
    assert not clock._events  # every batch's device events were folded in as the job went
    lab = LabelStore.open(store.path).labeler("t")
    return {p: np.asarray(lab.array(p)[:]) for p in lab.array_paths if p != "done"}


@pytest.mark.timeout(300)
def test_gpu_worker_labels_like_the_cpu_reference(tmp_path):
    shards = make_bench_shards(tmp_path / "shards", shards=3, per_shard=9, min_size=40, max_size=200, num_classes=10)
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=4, topk=4)
    torch.manual_seed(0)
    cpu_teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="none"), torch.device("cpu"))
    gpu_teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="none", compile="false"), torch.device("cuda"))
    gpu_teacher.model.load_state_dict(cpu_teacher.model.state_dict())
    want = _label(tmp_path / "cpu", shards, cpu_teacher, device="cpu", render_backend="pillow", decode_workers=2)
    got = _label(tmp_path / "gpu", shards, gpu_teacher, device="cuda", decode_pool="process", decode_workers=3)
    for name in got:
        if "logit" in name or "tail" in name:  # views within 1 grey level, float32 on another device
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=0.05)
        elif "class" in name:
            assert (got[name][..., 0] == want[name][..., 0]).mean() > 0.95
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.timeout(300)
def test_the_device_loop_never_waits_on_the_device(tmp_path):
    """A job's launches (uploads, render, the graphed forward + top-k, the copies back) queue device work without
    a host sync: the second job of a warm teacher runs under `torch.cuda.set_sync_debug_mode("error")`, where any
    synchronizing CUDA call raises and fails its batch's shards. Waiting for a batch's results is an event's
    wait, which the mode allows: the loop waits only where it means to."""
    shards = make_bench_shards(tmp_path / "shards", shards=3, per_shard=9, min_size=40, max_size=200, num_classes=10)
    spec = build_labeler_spec(name="t", model=MODEL, num_classes=10, views=4, topk=4)
    teacher = build_teacher(spec, WorkerSettings(checkpoint=None, amp="bf16", compile="false", cuda_graph="true"),
                            torch.device("cuda"))
    settings = dict(device="cuda", decode_pool="process", decode_workers=2, amp="bf16", cuda_graph="true")
    warm = _label(tmp_path / "warm", shards, teacher, **settings)  # captures the graph, allocates the pools
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _label(tmp_path / "strict", shards, teacher, **settings)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in got:  # other batch compositions (decode order), the same views and teacher
        if "logit" in name or "tail" in name:
            np.testing.assert_allclose(got[name].astype(np.float32), warm[name].astype(np.float32), atol=0.05, rtol=0.02)
        elif "class" in name:
            assert (got[name][..., 0] == warm[name][..., 0]).mean() > 0.95
        else:
            np.testing.assert_array_equal(got[name], warm[name], err_msg=name)
