"""Every Ray call of the project: start/join a cluster, count shards, label shards on a pool of actors.

One actor per GPU (`num_gpus=1`), or CPU actors when the cluster has no GPU. An actor keeps its
teacher loaded across shards. Fault tolerance comes from Ray: a worker process that dies mid-shard is
restarted (`max_restarts`) and the in-flight shard re-run (`max_task_retries`); since a shard is
written only when complete (`done` last), the retry writes exactly what an uninterrupted run would.
Errors inside a shard (a truncated tar, a capacity error) are returned as failed outcomes with the
URL, not raised, so the other shards finish. We schedule with our own small loop instead of
`ray.util.ActorPool` because the pool's `get_next_unordered` does not say which input failed.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import ray

from labeler.fault_injection import FaultInjection
from labeler.shard_outcome import ShardOutcome
from labeler.work_unit import ShardLabeler
from labeler.worker_settings import WorkerSettings, resolve_shards_in_flight
from labelstore.shard_format import ShardReadError, shard_identity

WORKER_RESTARTS = 3  # per actor: process deaths survived (and in-flight shards retried)


@dataclass(frozen=True)
class ClusterPlan:
    """How many actors of which kind the job will start."""

    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float

    def describe(self, store_writers: int = 0) -> str:
        kind = "GPU" if self.gpus_per_worker else "CPU"
        decoders = max(1, int(self.cpus_per_worker))
        pool = "process(es)" if self.gpus_per_worker else "thread(s)"
        writers = f", {store_writers} store writer process(es)" if store_writers else ""
        return (f"{self.num_workers} {kind} worker(s), {self.cpus_per_worker:g} CPU each "
                f"({decoders} decode {pool}{writers})")


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join `address` ("auto", "ray://host:port") or start a local instance sized to the machine.

    A session that is already initialised (e.g. by a test fixture) is used and left running.
    """
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local, single-user: no token warnings
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # address="local" always starts a fresh instance: a stale `ray start` would otherwise hijack init().
        # num_cpus None: Ray sizes the instance to the machine (container CPU limits included).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def plan_workers(num_shards: int, cpus_per_worker: float = 1.0) -> ClusterPlan:
    """One worker per GPU holding all the node's CPUs per GPU (its decode pool); without GPUs, as many CPU
    workers as fit; never more workers than shards."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus > 0:
        per_gpu_cpus = max(1.0, cpus // gpus)
        return ClusterPlan(max(1, min(gpus, num_shards)), 1.0, per_gpu_cpus)
    per = min(max(cpus_per_worker, 0.1), cpus)
    return ClusterPlan(max(1, min(int(cpus // per), num_shards)), 0.0, per)


def worker_settings_for(plan: ClusterPlan, settings: WorkerSettings) -> tuple[WorkerSettings, str | None]:
    """The settings the plan's workers run with, and a line saying what was changed and why (None: nothing).

    A GPU worker holds one GPU and the node's CPUs per GPU, so it runs the teacher on that GPU and decodes
    with one process per CPU it holds, whatever `device` and `decode_workers` say; CPU workers keep them.
    """
    if not plan.gpus_per_worker:  # 0 = auto: one decode thread per CPU the actor holds, not per CPU of the node
        return (replace(settings, decode_workers=max(1, int(plan.cpus_per_worker))) if settings.decode_workers == 0
                else settings), None
    chosen = replace(settings, device="cuda", decode_workers=max(1, int(plan.cpus_per_worker)))
    changed = [f"{name} {getattr(settings, name)!r} -> {getattr(chosen, name)!r}" for name in ("device", "decode_workers")
               if getattr(settings, name) != getattr(chosen, name)]
    if not changed:
        return chosen, None
    return chosen, (f"GPU workers: {', '.join(changed)} (each worker holds one GPU and "
                    f"{plan.cpus_per_worker:g} CPUs, one decode process per CPU)")


def _identify_one(url: str) -> tuple[str, tuple[int, str, str] | None, str | None]:
    try:
        return url, shard_identity(url), None
    except ShardReadError as e:
        return url, None, str(e)


def identify_shards(urls: Sequence[str]) -> dict[str, tuple[int, str, str] | str]:
    """url → (number of samples, first key, last key), or the error text; read in parallel on the cluster
    (one task per shard)."""
    task = ray.remote(num_cpus=0.5, max_retries=2)(_identify_one)
    results = ray.get([task.remote(u) for u in urls])
    return {url: (ident if error is None else error) for url, ident, error in results}


class _LabelActor:
    """Ray actor around the plain `ShardLabeler` work unit."""

    def __init__(self, store_path: str, labeler_name: str, settings: WorkerSettings, fault: FaultInjection | None):
        self.labeler = ShardLabeler(store_path, labeler_name, settings, fault=fault)

    def label(self, shard_index: int, url: str) -> ShardOutcome:
        return self.labeler(shard_index, url)  # thread-safe: the actor runs several calls at once

    def close(self) -> None:
        self.labeler.close()  # stop its decode and store writer processes before Ray kills the actor


def _first_lines(error: Exception, limit: int = 800) -> str:
    """Ray errors carry whole remote tracebacks; keep the head (it names the cause) for the shard report."""
    text = str(error)
    return text if len(text) <= limit else text[:limit] + " …"


def label_shards(
    store_path: str,
    labeler_name: str,
    settings: WorkerSettings,
    shards: Sequence[tuple[int, str]],
    plan: ClusterPlan,
    on_outcome: Callable[[ShardOutcome], None] = lambda outcome: None,
    fault: FaultInjection | None = None,
    claim: Callable[[int], bool] = lambda index: True,
    release: Callable[[int], None] = lambda index: None,
) -> list[ShardOutcome]:
    """Label `shards` [(shard index, url where it is now)] on `plan.num_workers` actors with `settings` as given
    (see `worker_settings_for`); one outcome per shard labelled. A shard is dispatched only if `claim(index)`
    (another driver may hold or have finished it: then it is left out), and `release(index)` follows its
    outcome."""
    urls = dict(shards)
    # Each actor labels several shards at once (a threaded actor): while one shard is written, its decode
    # processes already read the next ones and the GPU never waits between shards.
    in_flight_per_actor = resolve_shards_in_flight(settings, "cuda" if plan.gpus_per_worker else "cpu")
    actor_cls = ray.remote(_LabelActor).options(
        num_gpus=plan.gpus_per_worker, num_cpus=plan.cpus_per_worker, max_concurrency=in_flight_per_actor,
        max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS)
    actors = [actor_cls.remote(store_path, labeler_name, settings, fault) for _ in range(plan.num_workers)]
    todo, idle = deque(index for index, _ in shards), [a for a in actors for _ in range(in_flight_per_actor)]
    in_flight: dict = {}
    outcomes: list[ShardOutcome] = []
    try:
        while todo or in_flight:
            while todo and idle:
                index = todo.popleft()
                if not claim(index):
                    continue
                actor = idle.pop()
                in_flight[actor.label.remote(index, urls[index])] = (index, actor)
            if not in_flight:  # every actor is gone: the rest cannot run
                for index in todo:
                    outcomes.append(ShardOutcome(index, urls[index], ok=False, error="no live workers left"))
                    on_outcome(outcomes[-1])
                break
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, actor = in_flight.pop(ref)
            try:
                outcome = ray.get(ref)
                idle.append(actor)
            except ray.exceptions.RayActorError as e:  # died more often than it may restart, or failed to start
                outcome = ShardOutcome(index, urls[index], ok=False, error=f"worker died: {_first_lines(e)}")
            except ray.exceptions.RayError as e:
                outcome = ShardOutcome(index, urls[index], ok=False, error=f"{type(e).__name__}: {_first_lines(e)}")
                idle.append(actor)
            release(index)
            outcomes.append(outcome)
            on_outcome(outcome)
    finally:
        with contextlib.suppress(Exception):  # best effort: a dead actor has nothing left to close
            ray.get([a.close.remote() for a in actors], timeout=30)
        for actor in actors:  # never leave actors holding CPUs/GPUs
            ray.kill(actor)
    return outcomes
