"""The README's "Running a network" block, checked against the command line: every
``tooti`` command in it parses (each subcommand and flag exists, spelled in full), sets
only ``TOOTI_*`` variables tooti reads, and every ``tooti run`` builds settings that
``tooti run`` accepts, so a gateway listening beyond loopback says its auth mode (it
refuses to start without one). The commands run across machines (gateway.example,
relay.lan), so they are checked here rather than started; the newcomer path on one
machine is run for real by ``tests/test_readme_path.py``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.test_container_files import check_command, check_variables
from tooti.config import build_settings
from tooti.runner import check_auth, effective_roles

README = Path(__file__).resolve().parent.parent / "README.md"


def network_commands() -> list[tuple[dict[str, str], list[str]]]:
    """``(environment, tooti argv)`` of each command of the section's ``sh`` block."""
    text = README.read_text()
    section = text.split("\n## Running a network\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        env = {}
        while re.fullmatch(r"[A-Z_]+=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        assert words[0] == "tooti", line
        commands.append((env, words[1:]))
    return commands


def test_every_network_command_is_one_tooti_accepts() -> None:
    commands = network_commands()
    runs = [(env, argv) for env, argv in commands if argv[0] == "run"]
    gateways = 0
    for env, argv in commands:
        check_variables(env, "README's Running a network")
        args = check_command(argv)
        if argv[0] != "run":
            continue
        settings = build_settings(args, env)
        check_auth(settings)  # raises for a gateway beyond loopback without gateway.auth
        if "gateway" in effective_roles(settings) and not settings.gateway.listen.startswith(
                "127.0.0.1:"):
            gateways += 1
            assert settings.gateway.auth == "keys" and settings.gateway.admin_key
            assert settings.gateway.join_token, "nodes on other machines need the token"
    assert gateways == 2  # the plain and the TLS gateway
    assert len(runs) >= 6
    # a key for a user is made as the text says, with the admin key of the gateway
    made = [(env, argv) for env, argv in commands if argv[:2] == ["keys", "create"]]
    assert made and all(env.get("TOOTI_ADMIN_KEY") for env, _ in made)
