"""The container files (``Dockerfile``, ``compose.yaml``, ``.dockerignore``) against the
code they drive, without docker: every ``tooti`` command they run parses with the CLI's
own parser (each flag spelled out, as argparse would also take an abbreviation), every
``TOOTI_*`` variable they set is one the config reads, the settings they make pass the
checks ``tooti run`` makes (a gateway on 0.0.0.0 needs ``gateway.auth``), the health
checks answer from a real gateway (503 until it can serve, then 200), the runtime user
is not root, and the compose network, run as processes on loopback with the same
commands and environment, serves the ``curl`` the README prints.

PyYAML is not a dependency: ``compose.yaml`` is kept to a small subset of YAML (block
mappings and lists, one scalar or JSON array per line, no anchors) that
:func:`read_compose` reads and refuses to go beyond. When ``docker`` can build here, the
image is built and run too; otherwise that test is skipped, saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Network
from tests.hostile.test_tls import Authority, start_gateway, start_node, wait_for_node
from tests.processes import EXIT_TIMEOUT, START_TIMEOUT, Tooti
from tooti.cli import _parser
from tooti.config import _OPTIONS, ConfigError, build_settings
from tooti.healthcheck import readyz_url
from tooti.runner import check_auth, effective_roles

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"

CONFIG_VARIABLES = frozenset({var for var, _flag in _OPTIONS.values()} | {"TOOTI_CONFIG"})
"""The ``TOOTI_*`` variables ``tooti run`` reads (tooti/config.py)."""


# ------------------------------------------------------------ reading the Dockerfile

@dataclass(frozen=True)
class Instruction:
    name: str
    """Upper case: FROM, RUN, ENV, ..."""
    args: str
    stage: int
    """0 for the first FROM's stage, 1 for the next, ..."""


def read_dockerfile(text: str) -> list[Instruction]:
    """The instructions, continuation lines joined and comments dropped (as docker does)."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        logical, pending = pending + line, ""
        name, _, args = logical.strip().partition(" ")
        if name.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(name.upper(), args.strip(), stage))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def the(instructions: list[Instruction], name: str, stage: int | None = None) -> Instruction:
    """The one ``name`` instruction (of ``stage``)."""
    found = [i for i in instructions if i.name == name and stage in (None, i.stage)]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument: shell form would run through /bin/sh."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(instructions: list[Instruction], stage: int) -> dict[str, str]:
    """What the ENV instructions of ``stage`` set (``KEY=VALUE`` form)."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.name == "ENV" and instruction.stage == stage:
            for pair in shlex.split(instruction.args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=VALUE form"
                env[key] = value
    return env


def healthcheck(instructions: list[Instruction], stage: int) -> list[str]:
    """The HEALTHCHECK's command (its options dropped)."""
    args = the(instructions, "HEALTHCHECK", stage).args
    options, sep, command = args.partition("CMD ")
    assert sep and all(o.startswith("--") for o in options.split()), args
    return exec_form(command)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return read_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(dockerfile: list[Instruction]) -> int:
    """The final stage (the image)."""
    return dockerfile[-1].stage


# ------------------------------------------------------------ reading compose.yaml

_UNSUPPORTED = re.compile(r"^\s*[&*!|>{]|:\s+[&*!|>{]|:\s*[|>][-+]?\s*$")


def _scalar(text: str) -> Any:
    if text.startswith(("[", '"')):
        return json.loads(text)
    return {"true": True, "false": False}.get(text, text)


def read_compose(text: str) -> dict[str, Any]:
    """The subset of YAML compose.yaml keeps to: ``key: value`` (a plain or JSON-quoted
    scalar, or a JSON array), ``key:`` opening a block mapping or list, ``- item``."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        assert "\t" not in raw and not _UNSUPPORTED.search(raw), (
            f"compose.yaml:{number} goes beyond the YAML this test reads: {raw!r}")
        lines.append((len(raw) - len(raw.lstrip(" ")), raw.strip(), number))
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]
    for index, (indent, content, number) in enumerate(lines):
        while indent <= stack[-1][0]:
            stack.pop()
        parent = stack[-1][1]
        if content.startswith("- "):
            assert isinstance(parent, list), f"compose.yaml:{number}: a list item here"
            parent.append(_scalar(content[2:].strip()))
            continue
        assert isinstance(parent, dict), f"compose.yaml:{number}: a mapping key here"
        key, sep, value = content.partition(":")
        assert sep and (not value or value.startswith(" ")), f"compose.yaml:{number}"
        value = value.strip()
        if value:
            parent[key] = _scalar(value)
            continue
        following = lines[index + 1] if index + 1 < len(lines) else (0, "", 0)
        if following[0] <= indent:
            parent[key] = None
            continue
        parent[key] = [] if following[1].startswith("- ") else {}
        stack.append((indent, parent[key]))
    return root


_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def interpolate(text: str) -> str:
    """Compose's (and the shell's) ``${VAR:-default}`` with VAR unset: the demo's values."""
    assert "$" not in _DEFAULTED.sub("", text), f"only ${{VAR:-default}} is expected: {text}"
    return _DEFAULTED.sub(lambda m: m.group(2), text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return read_compose(COMPOSE.read_text())


# ------------------------------------------------------------ the CLI

def check_command(argv: list[str]) -> argparse.Namespace:
    """Parse ``tooti ARGV`` with the CLI's parser; fail unless every subcommand and flag
    exists, spelled out in full."""
    parser = _parser()
    current = parser
    for word in argv:
        if word.startswith("-"):
            flag = word.partition("=")[0]
            assert flag in current._option_string_actions, (
                f"{flag} is not a flag of `{current.prog}` (in {argv})")
            continue
        subcommands = [a for a in current._actions
                       if isinstance(a, argparse._SubParsersAction)]
        if subcommands and word in subcommands[0].choices:
            current = subcommands[0].choices[word]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"tooti {' '.join(argv)}: {errors.getvalue()}") from None


def check_variables(env: Mapping[str, str], where: str) -> None:
    unknown = sorted(k for k in env if k.startswith("TOOTI_") and k not in CONFIG_VARIABLES)
    assert not unknown, f"{where} sets variables tooti does not read: {unknown}"


# ------------------------------------------------------------ Dockerfile

def test_entrypoint_is_the_tooti_command(dockerfile: list[Instruction], runtime: int) -> None:
    assert exec_form(the(dockerfile, "ENTRYPOINT", runtime).args) == ["tooti"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tooti"] == "tooti.cli:main"


def test_default_command_exists_in_the_cli(dockerfile: list[Instruction],
                                           runtime: int) -> None:
    argv = exec_form(the(dockerfile, "CMD", runtime).args)
    args = check_command(argv)
    assert argv[0] == "run" and args.role == ["gateway"]


def test_image_settings_pass_what_tooti_run_checks(dockerfile: list[Instruction],
                                                  runtime: int) -> None:
    """The image's default gateway listens beyond loopback, so it must choose an auth
    mode; it chooses keys (the safe one). Without it, `tooti run` would refuse."""
    env = env_of(dockerfile, runtime)
    check_variables(env, "the Dockerfile")
    args = check_command(exec_form(the(dockerfile, "CMD", runtime).args))
    settings = build_settings(args, env)
    check_auth(settings)
    assert settings.gateway.listen == "0.0.0.0:8080"
    assert settings.gateway.auth == "keys"
    assert settings.data_dir == "/data"
    without_auth = {k: v for k, v in env.items() if k != "TOOTI_AUTH"}
    with pytest.raises(ConfigError, match=r"gateway\.auth"):
        check_auth(build_settings(args, without_auth))


def test_multi_stage_slim_non_root(dockerfile: list[Instruction], runtime: int) -> None:
    froms = [i for i in dockerfile if i.name == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    args = {k: v.strip('"') for k, _, v in (i.args.partition("=") for i in dockerfile
                                              if i.name == "ARG" and i.stage == -1)}
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim"
    assert all(i.args.startswith("${PYTHON_IMAGE} AS ") for i in froms)
    user = the(dockerfile, "USER", runtime).args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a fixed numeric uid (runAsNonRoot can check it)"
    assert gid.isdigit() and int(gid) != 0
    run = " ".join(i.args for i in dockerfile if i.name == "RUN" and i.stage == runtime)
    assert f"--uid {uid}" in run and "--no-index" in run
    for compiler in ("gcc", "build-essential", "apt-get install"):
        assert compiler not in run
    # nothing runs as root after USER in the image
    names = [i.name for i in dockerfile if i.stage == runtime]
    assert "USER" not in names[names.index("USER") + 1:]


def test_data_dir_is_a_volume_and_the_port_is_exposed(dockerfile: list[Instruction],
                                                      runtime: int) -> None:
    env = env_of(dockerfile, runtime)
    volume = the(dockerfile, "VOLUME", runtime).args
    volumes = exec_form(volume) if volume.startswith("[") else volume.split()
    assert volumes == [env["TOOTI_DATA_DIR"]]
    assert the(dockerfile, "EXPOSE", runtime).args == env["TOOTI_LISTEN"].rpartition(":")[2]
    assert "EXTRAS" in {i.args.partition("=")[0] for i in dockerfile if i.name == "ARG"}


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for excluded in (".venv", ".git", "tests", "**/__pycache__", ".mypy_cache",
                     ".pytest_cache", ".ruff_cache"):
        assert excluded in patterns
    copied = {p for i in read_dockerfile(DOCKERFILE.read_text()) if i.name == "COPY"
              and "--from" not in i.args for p in i.args.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "tooti"}
    assert not copied & patterns


_DOCKER_VALUE_OPTIONS = frozenset({"-p", "-e", "-v", "--name", "--entrypoint", "--network",
                                   "-u", "--user", "--env-file"})


def _readme_container_section() -> str:
    text = README.read_text()
    section = text[text.index("\n## Container"):]
    return section[:section.index("\n## ", 1)]


def readme_docker_runs() -> list[list[str]]:
    """The ``tooti`` argv of every ``docker run ... IMAGE ARGS`` in the README's Container
    section (fenced lines and inline code; ``...`` stands for options)."""
    section = _readme_container_section()
    fenced = re.findall(r"```sh\n(.*?)```", section, re.S)
    inline = re.findall(r"`([^`]+)`", re.sub(r"```sh\n.*?```", "", section, flags=re.S))
    candidates = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    candidates += [" ".join(code.split()) for code in inline]
    runs = []
    for candidate in candidates:
        if not candidate.startswith("docker run "):
            continue
        words = iter(shlex.split(candidate.partition(" #")[0])[2:])
        for word in words:
            if word in _DOCKER_VALUE_OPTIONS:
                next(words)
            elif not word.startswith("-") and word != "...":
                assert word == "tooti" or word.startswith("tooti:"), f"image? {candidate}"
                runs.append(list(words))
                break
    return runs


def test_readme_docker_commands_exist_in_the_cli() -> None:
    runs = readme_docker_runs()
    assert len(runs) >= 3  # the gateway, a node, gateway + node on the embedded model
    for argv in runs:
        if argv:
            check_command(argv)


# ------------------------------------------------------------ compose.yaml

def test_compose_is_a_gateway_a_relay_and_two_simulated_nodes(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    commands = {name: service["command"] for name, service in services.items()}
    roles = {name: check_command(argv).role for name, argv in commands.items()}
    assert roles["gateway"] == ["gateway"] and roles["relay"] == ["relay"]
    nodes = [name for name, role in roles.items() if role == ["node"]]
    assert len(nodes) == 2
    for name in nodes:
        args = check_command(commands[name])
        assert args.backend == ["simulated"]
        assert args.peer == ["ws://relay:8080"], "nodes dial the relay"
    assert check_command(commands["relay"]).peer == ["ws://gateway:8080"]
    assert services["gateway"]["ports"] == ["127.0.0.1:8080:8080"]
    assert all("ports" not in s for n, s in services.items() if n != "gateway")


def test_compose_environment_and_settings(compose: dict[str, Any],
                                         dockerfile: list[Instruction], runtime: int) -> None:
    image_env = env_of(dockerfile, runtime)
    tokens = set()
    for name, service in compose["services"].items():
        env = {k: interpolate(v) for k, v in service["environment"].items()}
        check_variables(env, f"compose.yaml's {name}")
        tokens.add(env["TOOTI_JOIN_TOKEN"])
        settings = build_settings(check_command(service["command"]), {**image_env, **env})
        check_auth(settings)
        if "gateway" in effective_roles(settings):
            assert settings.gateway.auth == "keys" and settings.gateway.admin_key
    assert len(tokens) == 1, "one join token for the whole network"
    assert "${TOOTI_JOIN_TOKEN:-" in COMPOSE.read_text()


def test_compose_volumes_healthchecks_and_start_order(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], compose["volumes"]
    used = []
    for name, service in services.items():
        (volume,) = service["volumes"]
        source, _, target = volume.partition(":")
        assert target == "/data" and source in volumes, "a named volume per data dir"
        used.append(source)
        assert "healthcheck" in service, f"{name}: a health check, or disable: true"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services
            assert condition["condition"] in ("service_started", "service_healthy")
            if condition["condition"] == "service_healthy":
                assert "test" in services[dependency]["healthcheck"]
    assert len(set(used)) == len(used) == len(volumes), "no data dir shared (it is locked)"
    assert services["node-1"]["depends_on"]["relay"]["condition"] == "service_healthy"
    # the gateway is ready only once nodes arrive through the relay: waiting for it to be
    # healthy before starting the relay would wait forever
    assert services["relay"]["depends_on"]["gateway"]["condition"] == "service_started"
    for name in ("gateway", "relay"):  # ready: can serve / has its upstream link
        check = services[name]["healthcheck"]["test"]
        assert check == ["CMD", *PROBE]


def test_compose_reader_refuses_what_it_does_not_read() -> None:
    with pytest.raises(AssertionError, match="goes beyond"):
        read_compose("x-common: &common\n  image: tooti\n")
    with pytest.raises(AssertionError, match="goes beyond"):
        read_compose("services:\n  a:\n    command: |\n      run\n")
    assert read_compose("a:\n  b: [\"c\"]\n  d:\n    - \"e:f\"\n  g:\n") == {
        "a": {"b": ["c"], "d": ["e:f"], "g": None}}


# ------------------------------------------------------------ health checks, for real

PROBE = ["python", "-m", "tooti.healthcheck"]
"""The health check of the image and of compose's gateway and relay."""


async def probe(command: list[str], port: int, **env: str) -> int:
    """Run a health check's python command against 127.0.0.1:``port`` (as the image's
    TOOTI_LISTEN says, with ``env`` added); its exit code."""
    argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    environ = {name: value for name, value in os.environ.items()
               if name != "TOOTI_TLS_CERT"}
    environ.update(TOOTI_LISTEN=f"0.0.0.0:{port}", **env)
    done = await trio.run_process(argv, env=environ, check=False, capture_stderr=True)
    return done.returncode


async def test_image_healthcheck_reads_readyz(network: Network, dockerfile: list[Instruction],
                                              runtime: int) -> None:
    command = healthcheck(dockerfile, runtime)
    assert command == PROBE
    port = int(network.url.rpartition(":")[2])
    assert await probe(command, port) == 1, "no node yet: 503, the check fails"
    await network.add_node()
    assert await probe(command, port) == 0


async def test_image_healthcheck_speaks_https_to_a_gateway_with_a_certificate(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """With TOOTI_TLS_CERT set (or --tls-cert given to the main process) the gateway
    serves only https: the probe asks https, not checking the certificate."""
    authority = Authority.create(tmp_path)
    authority.issue()
    running = await start_gateway(nursery, authority)
    await start_node(nursery, running.tunnel_url, peer_ca=str(authority.ca_path))
    await wait_for_node(running.gateway, "node-a")
    cert = str(authority.cert_path)
    assert await probe(PROBE, running.port, TOOTI_TLS_CERT=cert) == 0
    assert await probe(PROBE, running.port) == 1, "plain http to a TLS port fails"
    running.gateway.shutdown()


def test_the_probe_reads_flags_before_the_environment() -> None:
    environ = {"TOOTI_LISTEN": "0.0.0.0:8080"}
    assert readyz_url([], environ) == "http://127.0.0.1:8080/readyz"
    assert readyz_url(["tooti", "run", "--listen", "0.0.0.0:9000", "--tls-cert=/c.pem"],
                      environ) == "https://127.0.0.1:9000/readyz"
    assert readyz_url([], {"TOOTI_TLS_CERT": "/c.pem"}) == "https://127.0.0.1:8080/readyz"
    assert readyz_url(["tooti", "--listen"], {}) == "http://127.0.0.1:8080/readyz"


# ------------------------------------------------------------ compose, as processes

def _readme_curl_lines() -> list[str]:
    """The lines of the README's Container section's curl command."""
    section = _readme_container_section()
    lines = section[section.index("curl "):].splitlines()
    end = next(i for i, line in enumerate(lines) if not line.endswith("\\"))
    return lines[:end + 1]


def _readme_curl() -> list[str]:
    """The README's Container section's curl command, as argv."""
    return shlex.split(" ".join(line.rstrip("\\") for line in _readme_curl_lines()))


def _curl_request(argv: list[str]) -> tuple[str, dict[str, str], bytes]:
    """URL, headers and body of a ``curl URL -H ... -d ...`` command."""
    assert argv[0] == "curl"
    url, headers, body, words = "", {}, b"", iter(argv[1:])
    for word in words:
        if word == "-H":
            name, _, value = next(words).partition(":")
            headers[name.strip()] = interpolate(value.strip())
        elif word == "-d":
            body = next(words).encode()
        else:
            assert not word.startswith("-"), f"unexpected curl option {word}"
            url = word
    return url, headers, body


@contextlib.asynccontextmanager
async def compose_processes(root: Path, compose: dict[str, Any],
                            image_env: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
    """A starter of compose.yaml's services as ``python -m tooti`` processes on loopback:
    the image's environment, then the service's, each its own data dir; service host
    names become ``127.0.0.1:PORT`` of the process started for them."""
    started: dict[str, Tooti] = {}
    ports: dict[str, int] = {}
    async with trio.open_nursery() as nursery:

        async def start(name: str) -> Tooti:
            service = compose["services"][name]
            argv = list(service["command"])
            for other, port in ports.items():
                argv = [a.replace(f"ws://{other}:8080", f"ws://127.0.0.1:{port}")
                        for a in argv]
            env = {k: v for k, v in os.environ.items() if not k.startswith("TOOTI_")}
            env.update(image_env)
            env.update({k: interpolate(v) for k, v in service["environment"].items()})
            env.update(TOOTI_LISTEN="127.0.0.1:0", TOOTI_DATA_DIR=str(root / name),
                       PYTHONUNBUFFERED="1")
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tooti", *argv], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert process.stdout is not None
            child = started[name] = Tooti(process, name)
            nursery.start_soon(child.pump, process.stdout)
            if set(check_command(argv).role) & {"gateway", "relay"}:
                with trio.fail_after(START_TIMEOUT):
                    match = await child.wait_for(r"listening on http://127\.0\.0\.1:(\d+)")
                ports[name] = int(match.group(1))
            return child

        try:
            yield {"start": start, "ports": ports, "children": started}
        except BaseException:
            for child in started.values():
                print(f"===== {child.name}\n{child.text}")
            raise
        finally:
            with trio.CancelScope(shield=True):
                for child in started.values():
                    child.signal(signal.SIGKILL)
                for child in started.values():
                    with trio.move_on_after(EXIT_TIMEOUT):
                        await child.process.wait()
            nursery.cancel_scope.cancel()


async def test_compose_network_serves_the_readme_curl(
        tmp_path: Path, compose: dict[str, Any], dockerfile: list[Instruction],
        runtime: int) -> None:
    services = compose["services"]
    check = {name: services[name]["healthcheck"]["test"][1:] for name in ("gateway", "relay")}
    async with compose_processes(tmp_path, compose, env_of(dockerfile, runtime)) as network:
        gateway = await network["start"]("gateway")
        port = network["ports"]["gateway"]
        assert await probe(check["gateway"], port) == 1, "no node yet: not ready"
        relay = await network["start"]("relay")
        with trio.fail_after(START_TIMEOUT):
            await relay.wait_for(r"connected to ws://127\.0\.0\.1:")
        assert await probe(check["relay"], network["ports"]["relay"]) == 0
        since = gateway.mark()
        for name in services:
            if name.startswith("node-"):
                await network["start"](name)
        with trio.fail_after(START_TIMEOUT):
            first = await gateway.wait_for(r"peer (\S+) serves tooti-sim \(via", since)
            await gateway.wait_for(rf"peer (?!{first.group(1)})\S+ serves tooti-sim \(via",
                                   since)
        assert await probe(check["gateway"], port) == 0

        url, headers, body = _curl_request(_readme_curl())
        url = url.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.post(url, headers=headers, content=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"].startswith(" tok0")
            refused = await http.post(url, headers={"content-type": "application/json"},
                                      content=body)
            assert refused.status_code == 401, "the container's gateway requires a key"

        # `docker compose exec gateway tooti peers`: the container's environment
        env = {**os.environ, **env_of(dockerfile, runtime),
               **{k: interpolate(v) for k, v in services["gateway"]["environment"].items()},
               "TOOTI_GATEWAY": f"http://127.0.0.1:{port}"}
        peers = await trio.run_process([sys.executable, "-m", "tooti", "peers"], env=env,
                                       capture_stdout=True, capture_stderr=True)
        listed = peers.stdout.decode()
        assert listed.count("via") >= 2 and "relay" in listed, listed


def test_compose_and_readme_print_the_same_curl() -> None:
    compose_lines = [line.removeprefix("#").strip() for line in COMPOSE.read_text().splitlines()]
    lines = _readme_curl_lines()
    assert len(lines) > 1
    for line in lines:
        assert line.strip() in compose_lines


# ------------------------------------------------------------ docker, when it can build

def _docker_problem() -> str:
    """Why the image cannot be built here ("" when it can)."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"docker cannot reach a daemon (`docker info`: {last})"
    return ""


DOCKER_PROBLEM = _docker_problem()


@pytest.mark.skipif(bool(DOCKER_PROBLEM), reason=f"image not built: {DOCKER_PROBLEM}")
def test_image_builds_and_runs_tooti_as_non_root() -> None:
    tag = f"tooti-test:{os.getpid()}"
    try:
        subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=1800)
        version = subprocess.run(["docker", "run", "--rm", tag, "--version"], check=True,
                                 capture_output=True, text=True, timeout=120)
        assert version.stdout.startswith("tooti ")
        uid = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
                             check=True, capture_output=True, text=True, timeout=120)
        assert uid.stdout.strip() != "0"
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=120)
