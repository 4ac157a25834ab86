"""`stl-labels generate`: label every shard not yet done with one labeler, resumably.

Order of work (nothing is written to the store before the settings and the shards check out):
 1. settings → LabelerSpec (arch, classes, grid from the model, mean/std, ViewSpec, S, K, checkpoint sha256);
 2. create the store, or open it and check seed and labeler spec (SchemaMismatch: a readable diff);
 3. match the given shards to the store by name (path relative to the dataset root: moved shards match);
    count the samples and first/last key of new and moved shards (every tar member is read, so a truncated
    shard is reported now, with its URL), check moved ones are the same, register the new readable ones;
 4. skip shards already done (logged); label the rest on Ray (pipelines/ray_jobs.py), each claimed with a
    lease first so a second driver on the same store takes other shards; summarise. Ctrl-C says what was
    finished (`GenerateInterrupted`) after Ray shut down.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from labeler.fault_injection import FaultInjection
from labeler.shard_outcome import ShardOutcome
from labeler.teacher_spec import build_labeler_spec, open_labeler_store
from labeler.worker_settings import WorkerSettings, resolve_store_writers
from labelstore import LabelerSpec, LabelerStore, LabelStore, SchemaMismatch, ViewSpec
from labelstore.leases import DEFAULT_TTL_S, ShardLeases
from labelstore.shard_format import absolute_url, expand_shard_urls
from pipelines import ray_jobs

AMP_CHOICES = ("none", "bf16", "fp16")


def default_view_settings() -> dict[str, Any]:
    """ViewSpec fields a config may set under `view.` (size comes from `input_size`)."""
    d = ViewSpec().to_dict()
    d.pop("size")
    d.pop("algo_version")
    return d


@dataclass(frozen=True)
class GenerateSettings:
    """Everything `stl-labels generate` needs; YAML presets and `--set` fill the same fields."""

    shards: tuple[str, ...] = ()  # URLs or brace patterns
    store: str = ""
    name: str = ""
    model: str = ""
    checkpoint: str | None = None
    num_classes: int | None = None  # None: the checkpoint's classifier rows; 1000 for random weights
    views: int = 32
    topk: int = 10
    seed: int = 0  # store seed: view params come from SeedSequence(seed, (row, view))
    rows_per_chunk: int = 256  # write unit (only used when the store is created)
    input_size: tuple[int, int] | None = None  # (h, w); None = the model's default input size
    mean: tuple[float, float, float] | None = None  # None = the model's pretrained_cfg mean
    std: tuple[float, float, float] | None = None
    view: dict = field(default_factory=default_view_settings)  # ViewSpec fields except size
    batch_size: int = 256
    amp: str = "bf16"
    compile: bool | str = "auto"  # auto = torch.compile on CUDA workers
    cuda_graph: bool | str = "auto"  # auto = on CUDA workers: a batch's forward + top-k is one captured CUDA graph
    channels_last: bool | str = "auto"  # auto = on CUDA workers: the teacher in channels-last memory
    address: str | None = None  # None = local Ray sized to the machine; "auto" or "ray://host:port"
    cpus_per_worker: float = 1.0  # CPU workers only (GPU workers get the node's CPUs per GPU)
    decode_workers: int = 0  # 0 = one per CPU the worker owns (processes on GPU workers, threads on CPU)
    decode_pool: str = "auto"  # auto | process | thread
    shards_in_flight: int = 0  # per worker; 0 = decode processes + 2 on GPU workers, 1 on CPU workers
    decode_device: str = "cpu"  # cuda: nvJPEG decode on GPU workers (see docs/benchmarks.md for its pixel difference)
    store_writers: int = -1  # shard-writing processes per worker; -1 = 4 with decode processes, 0 with threads
    render_backend: str = "auto"
    device: str = "auto"
    dump_views_dir: str | None = None
    lease_seconds: float = DEFAULT_TTL_S  # a claimed shard's lease; renewed while labelling (concurrent drivers)

    def __post_init__(self) -> None:
        missing = [f for f in ("store", "name", "model") if not getattr(self, f)]
        if not self.shards:
            missing.insert(0, "shards")
        if missing:
            raise ValueError(f"generate: missing settings {missing} (give --{missing[0]} or set it in --config)")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"generate: amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        for name, low in (("views", 1), ("topk", 0), ("batch_size", 1), ("num_classes", 1), ("rows_per_chunk", 1), ("seed", 0)):
            if getattr(self, name) is not None and int(getattr(self, name)) < low:
                raise ValueError(f"generate: {name} must be >= {low}, got {getattr(self, name)}")
        if self.num_classes is not None and self.topk > self.num_classes:
            raise ValueError(f"generate: topk {self.topk} exceeds num_classes {self.num_classes}")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ValueError(f"generate: checkpoint {self.checkpoint} does not exist")
        unknown = set(self.view) - set(default_view_settings())
        if unknown:
            raise ValueError(f"generate: unknown view settings {sorted(unknown)}; known: {sorted(default_view_settings())}")
        ViewSpec(**self.view)  # validate early, naming the bad field

    def worker_settings(self) -> WorkerSettings:
        return WorkerSettings(checkpoint=self.checkpoint, batch_size=self.batch_size, amp=self.amp, compile=self.compile,
                              cuda_graph=self.cuda_graph, channels_last=self.channels_last,
                              device=self.device, render_backend=self.render_backend,
                              decode_workers=self.decode_workers, decode_pool=self.decode_pool,
                              shards_in_flight=self.shards_in_flight, decode_device=self.decode_device,
                              store_writers=self.store_writers,
                              dump_views_dir=self.dump_views_dir)


SHOWN_INVALID = 5  # invalid samples named in the summary; `stl-labels info --all-invalid` lists every one


@dataclass
class GenerateResult:
    outcomes: list[ShardOutcome]
    unreadable: dict[str, str]  # url → why it could not be counted/registered
    skipped_done: list[str]
    seconds: float  # the whole command: settings, store, counting, Ray start-up, labelling
    store: str = ""
    invalid: list[dict] = field(default_factory=list)  # [{url, key, reason}] of the shards labelled in this run
    label_seconds: float = 0.0  # from the first shard handed to Ray to the last outcome: what views/s divides by

    @property
    def failed(self) -> list[tuple[str, str]]:
        return sorted(self.unreadable.items()) + [(o.url, o.error or "") for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def views(self) -> int:
        return sum(o.views for o in self.outcomes if o.ok)

    def summary(self) -> str:
        """One line; views/s is views / label_seconds, the same clock the progress bar's rate uses."""
        done = [o for o in self.outcomes if o.ok]
        rate = self.views / self.label_seconds if self.label_seconds > 0 else 0.0
        return (f"labelled {_count(len(done), 'shard')} ({_count(sum(o.num_samples for o in done), 'sample')}, "
                f"{_count(self.views, 'view')}, {_count(sum(o.num_invalid for o in done), 'invalid sample')} recorded) "
                f"in {self.label_seconds:.1f} s = {rate:.1f} views/s ({self.seconds:.1f} s in all, with start-up); "
                f"{_human_bytes(sum(o.bytes_written for o in done))} of labels written (before compression); "
                f"skipped {_count(len(self.skipped_done), 'done shard')}; {_count(len(self.failed), 'shard')} failed"
                + self._invalid_lines())

    def _invalid_lines(self) -> str:
        if not self.invalid:
            return ""
        shown = [f"\n  {e['key']} in {e['url']}: {e['reason']}" for e in self.invalid[:SHOWN_INVALID]]
        more = len(self.invalid) - len(shown)
        return (f"\n{len(self.invalid)} invalid sample(s) recorded (kept as invalid rows):" + "".join(shown)
                + (f"\n  ... and {more} more" if more else "")
                + f"\nlist them all: stl-labels info {self.store} --all-invalid")


def _count(n: int, noun: str) -> str:
    """`1 shard`, `2 shards`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def labeler_spec_for(settings: GenerateSettings) -> LabelerSpec:
    """The LabelerSpec these settings produce; builds the model on CPU (grid, mean/std, checkpoint check)."""
    return build_labeler_spec(name=settings.name, model=settings.model, num_classes=settings.num_classes,
                              views=settings.views, topk=settings.topk, checkpoint=settings.checkpoint,
                              input_size=settings.input_size, mean=settings.mean, std=settings.std, view=settings.view)


def open_store(settings: GenerateSettings, spec: LabelerSpec) -> tuple[LabelStore, LabelerStore]:
    """Create or open the store and the labeler (`rows_per_chunk` only applies to a new store)."""
    return open_labeler_store(settings.store, seed=settings.seed, rows_per_chunk=settings.rows_per_chunk, spec=spec)


def run_with_progress(settings: GenerateSettings) -> GenerateResult:
    """`run_generate` with a rich progress bar (shards, views/s, ETA) and log lines on stderr."""
    console = Console(stderr=True)
    progress = Progress(TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    state: dict[str, Any] = {}

    def on_start(num_shards: int, views: int) -> None:
        progress.start()
        state.update(task=progress.add_task("label", total=num_shards, rate=""), start=time.perf_counter(), views=0)

    def on_outcome(outcome: ShardOutcome) -> None:
        # Same clock and count as the summary (views of labelled shards / time since labelling began).
        state["views"] += outcome.views if outcome.ok else 0
        rate = state["views"] / max(time.perf_counter() - state["start"], 1e-9)
        progress.update(state["task"], advance=1, rate=f"{rate:,.1f} views/s")

    try:
        return run_generate(settings, log=lambda line: console.print(line, markup=False, highlight=False),
                            on_outcome=on_outcome, on_start=on_start)
    finally:
        progress.stop()


def dataset_root(urls: list[str]) -> str | None:
    """The directory the shard names are taken relative to: the deepest directory common to every shard."""
    dirs = [posixpath.dirname(u.split("://", 1)[-1]) for u in urls if not u.startswith("pipe:")]
    if not dirs:
        return None
    try:
        return os.path.commonpath(dirs) or None
    except ValueError:  # mixed absolute and relative paths
        return None


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url or url.startswith("pipe:") else url


@contextlib.contextmanager
def heartbeat(leases: ShardLeases) -> Iterator[None]:
    """Renew `leases` every ttl/3 while the body runs (a driver that dies stops renewing: its leases expire)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(leases.ttl_s / 3):
            with contextlib.suppress(OSError):
                leases.renew()
    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            leases.release_all()


class GenerateInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during labelling; the message says what was finished and how to resume."""


def run_generate(settings: GenerateSettings, log: Callable[[str], None] = print,
                 on_outcome: Callable[[ShardOutcome], None] | None = None,
                 on_start: Callable[[int, int], None] | None = None) -> GenerateResult:
    """Label all shards of `settings` that are not done yet; see the module docstring for the order."""
    start = time.perf_counter()
    fault = FaultInjection.from_env()
    # Local paths are made absolute for the workers (other cwd, other nodes on a shared filesystem); the
    # store knows each shard by its name relative to the dataset root, so the same shards elsewhere match.
    urls = [absolute_url(u) for u in expand_shard_urls(settings.shards)]  # a glob pattern fails here
    check_local_shards_exist(urls)  # a typo in a pattern fails now, before a store or Ray exists
    root = dataset_root(urls)
    spec = labeler_spec_for(settings)
    store, labels = open_store(settings, spec)
    if not store.has_fingerprints:
        log(f"note: {store.path} is a schema {store.schema_version} store: its rows have no image fingerprints, "
            "so inputs are not checked against it")
    # by the whole name only: a new shard that shares a file name with a labelled one is not that shard
    matched = dict(zip(urls, store.match_shards(urls, missing_ok=True, by_file_name=False)))
    new_urls = [u for u in urls if matched[u] is None]
    moved = [u for u in urls if matched[u] is not None and matched[u].url != u]
    unreadable: dict[str, str] = {}
    outcomes: list[ShardOutcome] = []
    leases = ShardLeases(labels, ttl_s=settings.lease_seconds)
    label_seconds = 0.0
    with contextlib.ExitStack() as ray_context:
        started: list[bool] = []

        def ensure_ray() -> None:  # a re-run with nothing to do never starts Ray
            if not started:
                ray_context.enter_context(ray_jobs.ray_session(settings.address))
                started.append(True)

        if new_urls or moved:
            ensure_ray()
            log(f"reading {len(new_urls)} new and {len(moved)} moved shard(s)")
            idents = ray_jobs.identify_shards(new_urls + moved)
            unreadable = {u: c for u, c in idents.items() if isinstance(c, str)}
            for u in moved:  # the same name must mean the same shard: count and first/last key agree
                have, got = matched[u], idents[u]
                if not isinstance(got, str) and (have.num_samples, have.first_key or got[1], have.last_key or got[2]) != got:
                    raise SchemaMismatch(
                        f"shard {u} has the name {have.identity!r} of a labelled shard but other contents "
                        f"({got[0]} samples, keys {got[1]!r}..{got[2]!r}; labelled: {have.num_samples} samples, keys "
                        f"{have.first_key!r}..{have.last_key!r}); label it into a new store")
            registered = store.register_shards([(u, *idents[u]) for u in new_urls if not isinstance(idents[u], str)],
                                               root=root)
            matched.update(zip([u for u in new_urls if not isinstance(idents[u], str)], registered))
        for url, why in sorted(unreadable.items()):
            log(f"FAILED {url}: {why}")
        done = labels.done_mask()
        selected = {info.index: u for u, info in matched.items() if info is not None and u not in unreadable}
        skipped = [u for i, u in selected.items() if done[i]]
        todo = [(i, u) for i, u in sorted(selected.items()) if not done[i]]
        if skipped:
            log(f"skipping {_count(len(skipped), 'shard')} already done: {', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
        if todo:
            ensure_ray()
            plan = ray_jobs.plan_workers(len(todo), settings.cpus_per_worker)
            worker_settings, note = ray_jobs.worker_settings_for(plan, settings.worker_settings())
            writers = resolve_store_writers(worker_settings, "cuda" if plan.gpus_per_worker else "cpu")
            log(f"labelling {_count(len(todo), 'shard')} with {plan.describe(writers)}; {spec.views} views/sample, "
                f"top-{spec.topk}")
            if note:
                log(note)
            if on_start:
                on_start(len(todo), spec.views)
            finished: list[ShardOutcome] = []

            def outcome_seen(o: ShardOutcome) -> None:
                finished.append(o)
                (on_outcome or (lambda _: None))(o)

            claimed_elsewhere: list[str] = []

            def claim(index: int) -> bool:
                if leases.claim(index):
                    return True
                claimed_elsewhere.append(selected[index])
                return False
            label_start = time.perf_counter()
            try:
                with heartbeat(leases):
                    outcomes = ray_jobs.label_shards(store.path, spec.name, worker_settings, todo, plan,
                                                     on_outcome=outcome_seen, fault=fault, claim=claim,
                                                     release=leases.release)
            except KeyboardInterrupt:
                ok = sum(o.ok for o in finished)
                total = int(labels.done_mask().sum())
                raise GenerateInterrupted(
                    f"interrupted: {ok} shard(s) finished and kept in this run ({total} of {len(store.shards)} done in "
                    f"{store.path}); run the same command again to resume with the rest") from None
            label_seconds = time.perf_counter() - label_start
            if claimed_elsewhere:
                log(f"left {len(claimed_elsewhere)} shard(s) to another driver (claimed or finished there): "
                    f"{', '.join(claimed_elsewhere[:5])}{' …' if len(claimed_elsewhere) > 5 else ''}")
            for o in outcomes:
                if not o.ok:
                    log(f"FAILED {o.url}: {o.error}")
        elif not unreadable:
            log("nothing to do: every shard is already labelled")
    urls_by_index = {s.index: selected.get(s.index, s.url) for s in store.shards}
    invalid = [{"url": urls_by_index[e["shard"]], "key": e["key"], "reason": e["reason"]}
               for e in labels.errors(shards=[o.shard_index for o in outcomes if o.ok])]
    return GenerateResult(outcomes, unreadable, skipped, time.perf_counter() - start, store=settings.store,
                          invalid=invalid, label_seconds=label_seconds)


def check_local_shards_exist(urls: list[str]) -> None:
    """ValueError naming the local shard files that do not exist (remote URLs are checked when read)."""
    missing = [u for u in urls if (path := _local_path(u)) is not None and not Path(path).is_file()]
    if missing:
        raise ValueError(f"generate: {len(missing)} of {_count(len(urls), 'shard file')} do not exist: "
                         f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
