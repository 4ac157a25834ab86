"""The one import rule (docs/design.md "Packages and the import rule"), checked two ways:
statically (AST of every module, lazy imports included) and at run time in clean subprocesses."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("labelstore", "labeler", "trainer", "pipelines")


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Every absolute module name imported anywhere in a file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def offenders(paths: list[Path], forbidden) -> list[str]:
    return [f"{p.relative_to(REPO)}: {n}" for p in paths for n in sorted(imported_names(p)) if forbidden(p, n)]


def top(name: str) -> str:
    return name.split(".")[0]


def test_static_import_rule():
    heavy = {"torch", "ray", "typer", "timm", "webdataset", "torchvision", "labeler", "trainer", "pipelines"}
    assert offenders(modules_of("labelstore"), lambda p, n: top(n) in heavy) == []
    assert offenders(modules_of("labeler") + modules_of("trainer"),
                     lambda p, n: top(n) in {"ray", "typer", "pipelines"}) == []
    assert offenders(modules_of("labeler"), lambda p, n: top(n) == "trainer") == []
    # trainer may use labeler.models, the one device resolver and the one batched renderer with its flat image
    # transfer (the student replays its views on the device with the labeler's definition), the one fast JPEG
    # decode (the teacher's pixels), the one data-worker
    # priority rule, the one kernel-profile table, host-stack sampler, thread clock, call timer and allocator counts of the
    # benches, the one
    # CUDA-graph wrapper (the student's photometric ops), never teacher inference
    allowed = ("labeler.models", "labeler.device", "labeler.render_batch", "labeler.flat_images", "labeler.jpeg_decode",
               "labeler.worker_priority", "labeler.kernel_profile", "labeler.stack_sampler", "labeler.cuda_graph",
               "labeler.bench_calls", "labeler.allocator_counts", "labeler.thread_clock")
    assert offenders(modules_of("trainer"), lambda p, n: top(n) == "labeler" and not any(
        n == a or n.startswith(a + ".") for a in allowed)) == []
    assert offenders(modules_of("trainer"), lambda p, n: n.startswith(("labeler.teacher", "labeler.work_unit"))) == []
    everything = [p for pkg in PACKAGES for p in modules_of(pkg)]
    assert offenders(everything, lambda p, n: top(n) == "ray" and p != REPO / "pipelines/ray_jobs.py") == []
    assert offenders(everything, lambda p, n: top(n) == "typer" and not (
        p.parent == REPO / "pipelines" and p.name.startswith("cli_"))) == []


def loaded_after(code: str) -> dict:
    """Run `code` in a clean interpreter; return which packages it loaded and where ours resolve."""
    probe = code + "\nimport sys, json\n" + (
        "print(json.dumps({'mods': sorted({m.split('.')[0] for m in sys.modules}), "
        "'files': {p: getattr(sys.modules.get(p), '__file__', None) for p in %r}}))" % (PACKAGES,))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_labelstore_loads_no_torch_or_ray():
    got = loaded_after("import labelstore")
    assert not {"torch", "ray", "typer", "timm", "webdataset"} & set(got["mods"])
    assert Path(got["files"]["labelstore"]).resolve().is_relative_to(REPO)


def test_every_labelstore_module_and_a_shard_read_load_no_torch_or_webdataset():
    # The shard contract (labelstore.shard_format) is read by the labeling job and written by
    # `stl-labels shard`; `import webdataset` would load torch, so it must not come in through here.
    subs = [p for p in modules_of("labelstore") if p.name != "__init__.py"]
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in subs]
    assert "labelstore.shard_format" in names and "labelstore.shard_writer" in names
    code = ("import importlib, io, tarfile, tempfile, os\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
            + "from labelstore.shard_format import count_samples, expand_shard_urls\n"
            + "d = tempfile.mkdtemp(); p = os.path.join(d, 's-0.tar')\n"
            + "with tarfile.open(p, 'w') as t:\n"
            + "    i = tarfile.TarInfo('k.cls'); i.size = 1; t.addfile(i, io.BytesIO(b'3'))\n"
            + "assert [count_samples(u) for u in expand_shard_urls(os.path.join(d, 's-{0..0}.tar'))] == [1]\n")
    got = loaded_after(code)
    assert not {"torch", "ray", "typer", "timm", "webdataset"} & set(got["mods"])


def test_stl_labels_help_loads_no_ray_or_torch():
    code = ("import sys\nfrom pipelines.cli_labels import app\nsys.argv = ['stl-labels', '--help']\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n")
    got = loaded_after(code)
    assert not {"ray", "torch"} & set(got["mods"])
    assert Path(got["files"]["pipelines"]).resolve().is_relative_to(REPO)


@pytest.mark.parametrize("package", ["labeler", "trainer"])
def test_labeler_and_trainer_load_no_ray(package):
    subs = [p for p in modules_of(package) if p.name != "__init__.py"]
    assert subs, f"{package}/ has no modules: the import check would prove nothing"
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in subs]
    got = loaded_after("import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names))
    assert "ray" not in got["mods"]
    assert Path(got["files"][package]).resolve().is_relative_to(REPO)
