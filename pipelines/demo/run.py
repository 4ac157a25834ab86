"""`make demo` (python -m pipelines.demo): the whole STL loop on a laptop CPU, measured end to end.

    demo data → stl-train labeler → stl-labels generate → stl-labels verify → stl-labels report
    → stl-train student (with token labels, and the same recipe with β = 0) → stl-train eval (clean + corrupted)
    → token foreground IoU on the masked val split → one table

Every tool is run through its CLI (a subprocess, exactly what a user would type; each command is printed and
its output kept in OUT/logs/). A rerun reuses the data, finished trainings and labelled shards, so it continues
where it stopped (`--fresh` starts over). `--fast` is the CI variant: a few hundred images and a few optimiser steps per training run.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipelines.demo.corruptions import CORRUPTIONS
from pipelines.demo.data import DemoDataset, DemoDataSpec, write_demo_data
from pipelines.demo.summary import mean_accuracy, relative_mce, results_table, verdict

PRESET = Path(__file__).parents[1] / "presets" / "demo.yaml"
LABELER = "demo-tl"
MODEL = "fan_test_p4_hybrid_token"


@dataclass(frozen=True)
class DemoSettings:
    out: str = "demo_out"
    image_size: int = 64
    num_train: int = 4000
    num_val: int = 1000
    num_val_corrupt: int = 300
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    labeler_epochs: int = 11  # in all, the 1 warmup epoch of demo.yaml included
    student_epochs: int = 9
    max_steps_per_epoch: int | None = None   # None = whole epochs
    views: int = 4
    topk: int = 5
    view_scale: tuple[float, float] = (0.35, 1.0)
    # Objects of 30-70 % of the side (demo-data's default is 15-60 %) with class-coloured hues: with random
    # colours the tiny 4x4-token model stayed near chance for 600-840 updates (measured at both object
    # sizes), more than a 15-minute CPU budget gives it.
    object_scale: tuple[float, float] = (0.3, 0.7)
    colors: str = "class"   # each class its own hue band: learnable in minutes (see demo_data.DemoDataSpec)
    batch_size: int = 64
    workers: int = 1
    report_rows: int = 1000
    report_samples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "labeler_epochs", "student_epochs", "views", "topk", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo setting {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size != 64:
            raise ValueError("the demo's labeler (fan_test_p4_hybrid_token) is a 64-px model: image_size must be 64")


FAST = dict(num_train=160, num_val=48, num_val_corrupt=16, corruptions=("gaussian_noise", "contrast"),
            severities=(1, 3, 5), labeler_epochs=1, student_epochs=1, max_steps_per_epoch=3, views=2, batch_size=32,
            workers=0, report_rows=64, report_samples=2)


# --- running the tools -----------------------------------------------------------------------------

class StepFailed(RuntimeError):
    pass


def cli(tool: str, *args: str) -> tuple[list[str], str]:
    """(argv, what to show) for `stl-labels` / `stl-train` with this interpreter (no console scripts needed)."""
    module = {"stl-labels": "pipelines.cli_labels", "stl-train": "pipelines.cli_train"}[tool]
    argv = [sys.executable, "-c", f"import sys; sys.argv[0] = {tool!r}; from {module} import app; app()", *args]
    return argv, " ".join(shlex.quote(a) for a in (tool, *args))


def run(cmd: tuple[list[str], str], log: Path, say) -> str:
    """Run one tool, keep its output in `log`, return it; on failure raise with the log's tail."""
    argv, shown = cmd
    say(f"  $ {shown}")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log.write_text(f"$ {shown}\n{proc.stdout}")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise StepFailed(f"command failed (exit {proc.returncode}); full output in {log}:\n{tail}")
    return proc.stdout


# --- the steps ---------------------------------------------------------------------------------------

class Demo:
    def __init__(self, s: DemoSettings, say=print):
        self.s, self.say = s, say
        self.out = Path(s.out).resolve()
        self.data = self.out / "data"
        self.logs = self.out / "logs"
        self.results: dict = {"settings": {**asdict(s), "out": str(self.out)}, "steps": {}}

    # helpers
    def _step(self, n: int, title: str):
        self.say(f"\n[{n}/9] {title}")
        return time.perf_counter()

    def _done(self, name: str, t0: float, summary: str) -> None:
        secs = time.perf_counter() - t0
        self.results["steps"][name] = {"seconds": round(secs, 1), "summary": summary}
        self.say(f"  -> {summary} ({secs:.0f} s)")

    def _train_sets(self, epochs: int) -> list[str]:
        s = self.s
        sets = [f"schedule.epochs={epochs}", f"data.batch_size={s.batch_size}", f"data.workers={s.workers}",
                f"data.seed={s.seed}"]
        if epochs == 1:
            sets.append("schedule.warmup_epochs=0")
        if s.max_steps_per_epoch:
            sets.append(f"schedule.max_steps_per_epoch={s.max_steps_per_epoch}")
        return [a for x in sets for a in ("--set", x)]

    def _pattern(self, split: str) -> str:
        return DemoDataset.load(self.data).pattern(split)

    # 1
    def data_step(self) -> None:
        t0 = self._step(1, "demo data: 10 shape classes on scikit-image photo backgrounds, with object masks")
        s = self.s
        spec = DemoDataSpec(seed=s.seed, image_size=s.image_size, num_train=s.num_train, num_val=s.num_val,
                            num_val_corrupt=s.num_val_corrupt, corruptions=s.corruptions, severities=s.severities,
                            object_scale=s.object_scale, colors=s.colors)
        if (self.data / "dataset.json").exists():
            have = DemoDataset.load(self.data).spec
            if have != spec:
                raise StepFailed(f"{self.data} holds demo data made with other settings; use --fresh or another --out")
            self._done("data", t0, f"reusing {self.data}")
            return
        write_demo_data(self.data, spec, progress=lambda m: self.say(f"  {m}"))
        self._done("data", t0, f"{s.num_train} train / {s.num_val} val images, {s.num_val_corrupt} val images x "
                               f"{len(s.corruptions)} corruptions x {len(s.severities)} severities -> {self.data}")

    # 2
    def labeler_step(self) -> None:
        t0 = self._step(2, f"stage 1: train the token-labeler ({MODEL}, {self.s.labeler_epochs} epochs)")
        run_dir = self.out / "labeler"
        if (run_dir / "model_ema.pth").exists():
            self._done("labeler", t0, f"reusing {run_dir / 'model_ema.pth'}")
            return
        run(cli("stl-train", "labeler", "--shards", self._pattern("train"), "--out", str(run_dir),
                "--config", str(PRESET), *self._train_sets(self.s.labeler_epochs)), self.logs / "labeler.log", self.say)
        self._done("labeler", t0, f"{_last_epoch(run_dir)}; export {run_dir / 'model_ema.pth'}")

    # 3
    def generate_step(self) -> None:
        s = self.s
        t0 = self._step(3, f"stl-labels generate: {s.views} views per image, top-{s.topk} token logits (local Ray)")
        store = self.out / "labels.zarr"
        out = run(cli("stl-labels", "generate", "--shards", self._pattern("train"), "--store", str(store),
                      "--name", LABELER, "--model", MODEL, "--checkpoint", str(self.out / "labeler" / "model_ema.pth"),
                      "--num-classes", "10", "--views", str(s.views), "--topk", str(s.topk), "--seed", str(s.seed),
                      "--amp", "none", "--batch-size", "256", "--set", f"input_size=[{s.image_size},{s.image_size}]",
                      "--set", f"view.scale=[{s.view_scale[0]},{s.view_scale[1]}]"),
                  self.logs / "generate.log", self.say)
        self._done("generate", t0, _last_line(out, "labelled"))

    # 4
    def verify_step(self) -> None:
        t0 = self._step(4, "stl-labels verify: shapes, done mask, NaN/inf, class ids, view params")
        out = run(cli("stl-labels", "verify", str(self.out / "labels.zarr")), self.logs / "verify.log", self.say)
        self._done("verify", t0, out.strip().splitlines()[-1] if out.strip() else "ok")

    # 5
    def report_step(self) -> None:
        s = self.s
        t0 = self._step(5, "stl-labels report: token-label quality against the ground-truth masks")
        rep = self.out / "report"
        run(cli("stl-labels", "report", str(self.out / "labels.zarr"), "--labeler", LABELER, "--out", str(rep),
                "--masks", self._pattern("train"), "--classes", str(self.data / "classes.txt"),
                "--samples", str(s.report_samples), "--max-rows", str(s.report_rows)), self.logs / "report.log", self.say)
        r = json.loads((rep / "report.json").read_text())
        m = r["masks"]
        self.results["token_labels"] = {"top1_is_image_class": r["top1_is_image_class"],
                                        "iou_argmax": m["argmax"]["iou"], "iou_softmax": m["softmax_threshold"]["iou"],
                                        "iou_gumbel": m["gumbel"]["iou"], "gumbel_changes_argmax": r["gumbel_changes_argmax"]}
        self._done("report", t0, f"stored token labels vs masks: IoU argmax {_f(m['argmax']['iou'])}, softmax>="
                                 f"{m['softmax_threshold']['threshold']} {_f(m['softmax_threshold']['iou'])}, Gumbel "
                                 f"{_f(m['gumbel']['iou'])}; open {rep / 'index.html'}")

    # 6, 7
    def student_step(self, n: int, name: str, beta: float) -> None:
        what = "with token labels (beta = 1)" if beta else "same recipe without token labels (beta = 0)"
        t0 = self._step(n, f"stage 2: student {what}, {self.s.student_epochs} epochs")
        run_dir = self.out / name
        if (run_dir / "model_ema.pth").exists():
            self._done(name, t0, f"reusing {run_dir}")
            return
        run(cli("stl-train", "student", "--shards", self._pattern("train"), "--labels", str(self.out / "labels.zarr"),
                "--labeler", LABELER, "--out", str(run_dir), "--config", str(PRESET),
                *self._train_sets(self.s.student_epochs), "--set", f"tokens.beta={beta}"),
            self.logs / f"{name}.log", self.say)
        self._done(name, t0, _last_epoch(run_dir))

    # 8
    def eval_step(self) -> None:
        t0 = self._step(8, "stl-train eval: clean val and every corruption x severity")
        ds = DemoDataset.load(self.data)
        for name in ("student_tl", "student_cls"):
            args = ["eval", "--checkpoint", str(self.out / name / "last.pth"), "--shards", ds.pattern("val"),
                    "--config", str(PRESET), "--set", "data.workers=0", "--set", "data.batch_size=256",
                    "--json", str(self.out / f"eval_{name}.json")]
            if ds.corrupt:
                args[args.index("--config"):args.index("--config")] = ["--imagenet-c", str(self.data / "val-c")]
            out = run(cli("stl-train", *args), self.logs / f"eval_{name}.log", self.say)
            self.say("    " + "\n    ".join(out.strip().splitlines()[-3:]))
        self._done("eval", t0, f"wrote {self.out / 'eval_student_tl.json'} and eval_student_cls.json")

    # 9
    def token_iou_step(self) -> None:
        t0 = self._step(9, "token foreground IoU of each model on the masked val split")
        import torch  # the model libraries load only for this step, so `--help` stays quick

        from labeler.models import create_token_model, load_checkpoint, token_grid
        from pipelines.report.model_tokens import load_masked_split, token_foreground_quality, token_predictions
        from pipelines.config import load_config
        from trainer.config import TrainConfig

        cfg = load_config(TrainConfig, PRESET)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        size = (self.s.image_size, self.s.image_size)
        images, labels, masks = load_masked_split(DemoDataset.load(self.data).shards("val"), size)
        quality = {}
        for name, ckpt in (("labeler", "labeler/model_ema.pth"), ("student_tl", "student_tl/last.pth"),
                           ("student_cls", "student_cls/last.pth")):
            model = create_token_model(MODEL, num_classes=10)
            load_checkpoint(model, self.out / ckpt, prefer_ema=True)
            grid = token_grid(model, size)
            tok, cls = token_predictions(model, images, cfg.data.mean, cfg.data.std, grid)
            quality[name] = {**token_foreground_quality(tok, labels, masks, grid), "class_top1": float((cls == labels).mean())}
        self.results["token_iou"] = quality
        self._done("token_iou", t0, ", ".join(f"{k} IoU {_f(v['iou'])}" for k, v in quality.items()))

    # summary
    def summary(self) -> str:
        evals = {n: json.loads((self.out / f"eval_{n}.json").read_text()) for n in ("student_tl", "student_cls")}
        q = self.results.get("token_iou", {})

        def row(label, name):
            ev = evals.get(name)
            errs = (ev or {}).get("imagenet_c", {}).get("errors")
            base = evals["student_cls"].get("imagenet_c", {}).get("errors")
            return {"name": label, "clean": ev["clean"]["top1"] if ev else q.get(name, {}).get("class_top1"),
                    "corrupt": mean_accuracy(errs) if errs else None,
                    "mce": relative_mce(errs, base) if errs and base else None,
                    "token_iou": q.get(name, {}).get("iou"), "token_is_class": q.get(name, {}).get("token_top1_is_class")}

        rows = [row("student + token labels", "student_tl"), row("student, no token labels", "student_cls"),
                row("labeler (teacher, stage 1)", "labeler")]
        table = results_table(rows)
        tl = self.results.get("token_labels", {})
        lines = [table, "",
                 "clean/corrupted top-1: `stl-train eval` on the val split (corrupted: mean over "
                 f"{len(self.s.corruptions)} corruptions x {len(self.s.severities)} severities); rel. mCE: corruption "
                 "errors relative to the no-token-label student (= 100); token fg IoU: tokens whose top-1 is the image "
                 "class vs the object mask (>= half a token), val images; labeler clean top-1 from the same pass.",
                 f"stored token labels (train views): top-1 = image class {_pct(tl.get('top1_is_image_class'))}, "
                 f"IoU argmax {_f(tl.get('iou_argmax'))}, Gumbel {_f(tl.get('iou_gumbel'))}.",
                 verdict(rows[0], rows[1]) + ". One seed, a tiny model and a few epochs: differences of a few points "
                 "can be run-to-run noise."]
        self.results["table"] = rows
        return "\n".join(lines)

    def run_all(self) -> dict:
        start = time.perf_counter()
        self.data_step()
        self.labeler_step()
        self.generate_step()
        self.verify_step()
        self.report_step()
        self.student_step(6, "student_tl", 1.0)
        self.student_step(7, "student_cls", 0.0)
        self.eval_step()
        self.token_iou_step()
        text = self.summary()
        total = time.perf_counter() - start
        self.results["total_seconds"] = round(total, 1)
        self.say(f"\n=== demo finished in {total / 60:.1f} min ===\n{text}\n\nreport: {self.out / 'report' / 'index.html'}"
                 f"\nnumbers: {self.out / 'summary.json'}")
        (self.out / "summary.txt").write_text(text + "\n")
        (self.out / "summary.json").write_text(json.dumps(self.results, indent=1))
        return self.results


def _last_epoch(run_dir: Path) -> str:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [x for x in lines if x.get("kind") == "epoch"]
    if not epochs:
        return f"finished ({run_dir})"
    e = epochs[-1]
    return f"{e['epoch'] + 1} epochs, {e['update']} updates, last train loss {e['loss']:.3f}, {e.get('images_per_s', 0):.0f} img/s"


def _last_line(text: str, starts: str) -> str:
    hits = [x for x in text.splitlines() if x.startswith(starts)]
    return hits[-1] if hits else text.strip().splitlines()[-1]


def _f(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f} %"


def demo_settings(out: str = "demo_out", fast: bool = False, **changes) -> DemoSettings:
    """The full demo's settings (or the `fast` CI variant's) with `changes` that are not None applied."""
    settings = DemoSettings(out=out, **(FAST if fast else {}))
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})


def run_demo(settings: DemoSettings, fresh: bool = False) -> int:
    """Run every step (continuing a previous run in `settings.out` unless `fresh`); 0 when all succeeded."""
    out = Path(settings.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    print(f"STL demo -> {out.resolve()} ({'fast CI variant' if settings.max_steps_per_epoch else 'full'}; "
          f"logs in {out / 'logs'})", flush=True)
    try:
        Demo(settings, say=lambda m: print(m, flush=True)).run_all()
    except StepFailed as e:
        print(f"\ndemo stopped: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.demo [options]`: the same as `stl-labels demo [options]` (that command owns the options)."""
    from pipelines.cli_labels import app

    try:
        app(args=["demo", *(sys.argv[1:] if argv is None else argv)], prog_name="python -m pipelines.demo")
    except SystemExit as e:  # click's standalone mode always exits, with the command's code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
