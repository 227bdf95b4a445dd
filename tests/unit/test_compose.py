"""compose.yaml is checked against the code: every KEYLEDGER_* variable a service sets is
one the code reads, every command is a real ``keyledger`` command, the services find each
other, every service is health-checked, and no secret is written into the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from cli.main import app
from ledger.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
KEYLEDGER_SERVICES = {"keyledger-api", "relay", "archive", "detections"}
# A reference to a variable from .env or the shell: ${NAME}, ${NAME:?message}, ...
REFERENCE = re.compile(r"^\$\{([A-Z][A-Z0-9_]*)(?::?[-?+][^}]*)?\}$")
SECRET_NAME = re.compile(r"PIN|PASSWORD|SECRET|PASSPHRASE")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    value: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return value


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    value: dict[str, dict[str, Any]] = compose["services"]
    return value


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


class _Recording(dict[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return default

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        raise KeyError(key)


def _cli_commands() -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, command)`` for the ``keyledger`` app and every (sub)command in it."""

    def walk(path: tuple[str, ...], cmd: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():  # a group
            yield from walk((*path, name), sub)

    yield from walk((), typer.main.get_command(app))


def _without_references(value: str) -> tuple[str, list[str]]:
    """``value`` with each ``${...}`` replaced by ``REFn`` (so it parses as a URL), and
    the references in order."""
    refs: list[str] = []

    def keep(m: re.Match[str]) -> str:
        refs.append(m.group(0))
        return f"REF{len(refs) - 1}"

    return re.sub(r"\$\{[^}]*\}", keep, value), refs


def _password(url: str) -> str | None:
    """The password part of a URL as written (a ``${...}`` reference stays whole)."""
    plain, refs = _without_references(url)
    password = urlsplit(plain).password
    if password is not None and re.fullmatch(r"REF\d+", password):
        return refs[int(password[3:])]
    return password


def variables_the_code_reads() -> set[str]:
    """KEYLEDGER_* names read by ``Settings.from_env`` and by the CLI's ``envvar=``."""
    env = _Recording()
    Settings.from_env(env)
    names = {n for n in env.read if n.startswith("KEYLEDGER_")}
    for _, cmd in _cli_commands():
        for param in cmd.params:
            envvar = getattr(param, "envvar", None)
            names |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return names


def test_the_set_of_variables_the_code_reads_is_derived_not_copied() -> None:
    names = variables_the_code_reads()
    assert {"KEYLEDGER_DATABASE_URL", "KEYLEDGER_HSM_PIN", "KEYLEDGER_API_HOST"} <= names
    assert "KEYLEDGER_NOT_A_SETTING" not in names


def test_compose_runs_the_whole_stack(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "kafka"} | KEYLEDGER_SERVICES <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    roles = set(_environment(kafka)["KAFKA_PROCESS_ROLES"].split(","))
    assert roles == {"broker", "controller"}  # KRaft, single node
    assert any(v.endswith(":/var/lib/kafka/data") for v in kafka["volumes"])
    assert any(":/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])


def test_keyledger_services_are_built_from_the_repository_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in KEYLEDGER_SERVICES:
        build = services[name]["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), name
        text = dockerfile.read_text()
        assert re.search(r"^FROM python:3\.\d+-slim", text, re.M), name
        assert "softhsm2" in text and 'pip install --no-cache-dir ".[postgres]"' in text
    volumes = " ".join(v for n in KEYLEDGER_SERVICES for v in services[n]["volumes"])
    for mount in ("/var/lib/keyledger-hsm", "/var/lib/keyledger", "/var/lib/keyledger/archive"):
        assert f":{mount} " in volumes + " ", mount


def test_keyledger_services_set_only_keyledger_variables_the_code_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    known = variables_the_code_reads()
    for name in KEYLEDGER_SERVICES:
        env = _environment(services[name])
        assert env, name
        unknown = {k for k in env if not k.startswith("KEYLEDGER_") or k not in known}
        assert unknown == set(), (name, unknown)


def test_every_service_is_health_checked_or_waits_for_one_that_is(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec.get("condition") in ("service_healthy", "service_completed_successfully")
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
        checked = "healthcheck" in service
        waits = any(spec["condition"] == "service_healthy" for spec in depends.values())
        assert checked or waits, name
        if checked:
            assert service["healthcheck"]["test"], name


def test_keyledger_services_reach_kafka_through_its_advertised_listener(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka_env = _environment(services["kafka"])
    advertised = {
        entry.split("://", 1)[1] for entry in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    }
    for name in KEYLEDGER_SERVICES:
        bootstrap = _environment(services[name])["KEYLEDGER_KAFKA_BOOTSTRAP"]
        for server in bootstrap.split(","):
            assert server in advertised, (name, server)
            assert server.split(":")[0] in ("kafka", services["kafka"].get("hostname")), name
        if name != "keyledger-api":
            assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_the_database_url_names_the_postgres_service_and_its_database(
    services: dict[str, dict[str, Any]],
) -> None:
    pg = _environment(services["postgres"])
    for name in KEYLEDGER_SERVICES:
        raw = _environment(services[name])["KEYLEDGER_DATABASE_URL"]
        url = urlsplit(_without_references(raw)[0])
        assert url.scheme == "postgresql" and url.hostname == "postgres", name
        assert url.username == pg["POSTGRES_USER"] and url.path == "/" + pg["POSTGRES_DB"]
        assert REFERENCE.match(_password(raw) or ""), f"{name}: literal database password"
        assert _password(raw) == pg["POSTGRES_PASSWORD"], name  # the same reference


def test_no_secret_is_written_into_the_file(services: dict[str, dict[str, Any]]) -> None:
    header = "".join(line for line in COMPOSE.read_text().splitlines(True) if line[:1] == "#")
    for name, service in services.items():
        for var, value in _environment(service).items():
            if SECRET_NAME.search(var):
                match = REFERENCE.match(value)
                assert match, f"{name}: {var} holds a literal value"
                assert match.group(1) in header, f"{var} is not documented in the header"
            if "://" in value:
                password = _password(value)
                assert password is None or REFERENCE.match(password), (
                    f"{name}: {var} holds a literal password"
                )


def test_keyledger_commands_are_real_subcommands_with_real_options(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = dict(_cli_commands())
    for name in KEYLEDGER_SERVICES:
        argv = services[name]["command"]
        assert argv[0] == "keyledger", name
        words = [w for w in argv[1:] if not w.startswith("-")]
        path: tuple[str, ...] = ()
        for word in words:  # the longest prefix of words that names a command
            if (*path, word) in commands:
                path = (*path, word)
        runnable = not hasattr(commands[path], "commands") or getattr(
            commands[path], "invoke_without_command", False
        )  # a group runs only when it has a body of its own (``keyledger stream``)
        assert path and runnable, (name, argv)
        accepted = {opt for p in commands[path].params for opt in p.opts}
        used = {w.split("=", 1)[0] for w in argv[1:] if w.startswith("--")}
        assert used <= accepted, (name, used - accepted)
        required = {p.opts[0] for p in commands[path].params if getattr(p, "required", False)}
        assert {o for o in required if o.startswith("--")} <= used, (name, required)
    assert services["keyledger-api"]["command"][1:4] == ["serve", "--host", "0.0.0.0"]
    assert services["relay"]["command"][1:] == ["stream"]
