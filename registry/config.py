"""Configuration: TOML -> validated, frozen objects.

msgspec does the type checking, the ranges (``Meta``) and the choices
(``Literal``), and rejects unknown keys; the few value types with units
(durations, rates, port ranges, networks, in ``registry.model``) parse
themselves, and msgspec reports their errors with the key's path. An empty file is a
valid config: every key has the default documented in
``config/registry.example.toml``.

The defence constants no operator sets are not keys: ``limits.profile`` picks
a set of them (``PROFILES``, docs/limits.md). They still live in the sections
that use them, filled in from the profile when a file is loaded; a file that
sets one gets an error naming the profile instead. ``[tuning]`` overrides them
for tests and benchmarks, which need a ban of 2 s rather than 5 minutes.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from registry.errors import ConfigError

# the config's value types, imported from here by the modules that read them
from registry.model import CIDR as CIDR
from registry.model import Duration as Duration
from registry.model import PortRange as PortRange
from registry.model import Rate as Rate


def _bounded(positive: bool, most: float, expect: str) -> type[Duration]:
    return type("Duration", (Duration,), {"positive": positive, "most": most, "expect": expect})


Positive = _bounded(True, math.inf, "expected a duration > 0")
UpToADay = _bounded(True, 86400.0, "expected a duration > 0 and at most 24h")
UpToAMinute = _bounded(False, 60.0, "expected a duration from 0 to 60s")
# TCP_DEFER_ACCEPT: the kernel's schedule ends at 127 s
DeferAccept = _bounded(False, 120.0, "expected a duration from 0 (off) to 120s")


def _dec_hook(typ: type, value: Any) -> Any:
    if isinstance(typ, type) and issubclass(typ, Duration | Rate | PortRange | CIDR):
        return typ.parse(value)
    raise NotImplementedError(typ)


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


Count = Annotated[int, msgspec.Meta(ge=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


# Fields marked "profile" are limits.profile's constants (CONSTANTS below), not
# keys; their defaults here are the "internet" profile's.


class ServerConfig(_Section):
    listen: tuple[str, ...] = ("0.0.0.0:9000", "[::]:9000")
    udp: bool = True
    admin: str = "127.0.0.1:9100"  # "off" disables the admin endpoint
    admin_token: str = ""  # bearer token for the admin endpoint; empty: none
    db: Annotated[str, msgspec.Meta(min_length=1)] = "registry.db"
    grace_period: Duration = Duration(10.0)
    backlog: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 4096
    defer_accept: DeferAccept = DeferAccept(30.0)  # profile
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0  # 0: one per core; classroom: 1


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"


class ProtocolConfig(_Section):
    max_request_bytes: Annotated[int, msgspec.Meta(ge=32, le=65536)] = 512
    read_deadline: Positive = Positive(5.0)
    quiet_period: Positive = Positive(0.25)  # profile
    write_timeout: Positive = Positive(5.0)


class CallbackConfig(_Section):
    connect_timeout: Positive = Positive(3.0)
    verify_timeout: Duration = Duration(2.0)
    max_response_bytes: Annotated[int, msgspec.Meta(ge=64)] = 1024  # profile
    require_verification: bool = False
    greeting: str = "Hello from the instructor's Registry Server!"


class PolicyConfig(_Section):
    mode: Literal["strict", "nat-observed", "advertised"] = "strict"
    ports: tuple[PortRange, ...] = (PortRange(1024, 65535),)
    allow_networks: tuple[CIDR, ...] = ()  # empty: any address the mode permits
    deny_networks: tuple[CIDR, ...] = ()
    report_only_deny_networks: tuple[CIDR, ...] = ()
    allow_hostnames: bool = False
    resolve_timeout: Duration = Duration(2.0)  # profile


class AuthConfig(_Section):
    mode: Literal["none", "token"] = "none"
    secret: str = ""
    secret_file: str = ""


class RateLimitConfig(_Section):
    per_source: Rate = Rate(30, 60.0)
    per_target: Rate = Rate(30, 60.0)
    per_target_port: Rate = Rate(10, 60.0)
    global_: Rate = msgspec.field(default=Rate(100, 1.0), name="global")
    ipv6_prefix: Annotated[int, msgspec.Meta(ge=0, le=128)] = 64
    max_entries: AtLeastOne = 100_000
    errors_global: Rate = Rate(200, 1.0)  # profile
    error_fine: Count = 30  # profile


class LimitsConfig(_Section):
    profile: Literal["classroom", "internet"] = "internet"
    max_connections: AtLeastOne = 8192
    max_connections_per_source: AtLeastOne = 32
    max_callbacks_in_flight: AtLeastOne = 256
    max_callback_queue: Count = 1024
    ban_exempt_networks: tuple[CIDR, ...] = ()  # never banned (a class's shared NAT address)
    refusal_delay: Duration = Duration(0.5)  # profile, and the rest of this section
    max_refusal_delay: UpToAMinute = UpToAMinute(5.0)
    max_refusals_held: Count = 8192
    ban_after: Count = 10
    ban_after_ignored: Count = 1
    ban_duration: UpToADay = UpToADay(300.0)
    ban_spread: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    max_bans: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10000
    silent_drop_after: Count = 50
    silent_drop_duration: UpToADay = UpToADay(60.0)


class StoreConfig(_Section):
    retention: Duration = Duration(0.0)  # 0: keep forever


class UdpConfig(_Section):
    """UDP registrations (enabled by ``server.udp``): all profile constants."""

    cookie_window: Positive = Positive(30.0)
    max_datagram_bytes: Annotated[int, msgspec.Meta(ge=64, le=65507)] = 512
    unproven_per_source: Rate = Rate(10, 60.0)
    unproven_global: Rate = Rate(500, 1.0)


class ClassConfig(_Section):
    """The class being graded (docs/grading.md)."""

    # CSV with a header row: student (required), address (optional). A relative path is
    # taken from the config file's directory.
    roster: str = ""


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    protocol: ProtocolConfig = msgspec.field(default_factory=ProtocolConfig)
    callback: CallbackConfig = msgspec.field(default_factory=CallbackConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    ratelimit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    udp: UdpConfig = msgspec.field(default_factory=UdpConfig)
    class_: ClassConfig = msgspec.field(default_factory=ClassConfig, name="class")


DEFAULT = Config()

# server keys bound when the sockets and the store open: a reload keeps them
BOUND_AT_START = ("listen", "udp", "backlog", "defer_accept", "db", "admin", "workers")


def keep_bound(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with ``old``'s BOUND_AT_START keys, and the keys that differed."""
    moved = [k for k in BOUND_AT_START if getattr(new.server, k) != getattr(old.server, k)]
    server = msgspec.structs.replace(new.server, **{k: getattr(old.server, k) for k in moved})
    return msgspec.structs.replace(new, server=server), moved


# limits.profile: the defence constants, as (classroom, internet, what it is).
# "classroom": a class on one LAN, often all behind one NAT address, where a
# ban or a fine of that address would lock the whole class out (config/lab.toml).
# "internet": a registry anyone can reach (config/internet.toml); the default,
# because a registry whose operator chose nothing may well be exposed, and a
# class behind one NAT address is told to pick "classroom" (docs/limits.md).
PROFILES = ("classroom", "internet")
CONSTANTS: dict[str, tuple[Any, Any, str]] = {
    "server.defer_accept": (
        "30s",
        "30s",
        "TCP_DEFER_ACCEPT: silent connections wait in the kernel",
    ),
    "protocol.quiet_period": (
        "250ms",
        "250ms",
        "a request without a newline ends after this quiet",
    ),
    "callback.max_response_bytes": (
        4096,
        1024,
        "bytes read from a callback target before the conversation is cut",
    ),
    "policy.resolve_timeout": ("2s", "2s", "longest wait for a hostname's resolution"),
    "ratelimit.errors_global": ("200/second", "200/second", "protocol errors before pressure"),
    "ratelimit.error_fine": (0, 30, "tokens fined per protocol error under pressure; 0: never"),
    "limits.refusal_delay": ("500ms", "500ms", "a source's first refusal is answered this late"),
    "limits.max_refusal_delay": ("5s", "5s", "... doubling per repeat, up to this"),
    "limits.max_refusals_held": (8192, 8192, "refused connections waiting for their answer"),
    "limits.ban_after": (0, 10, "refusals of a source within 10 s that ban it; 0: never"),
    "limits.ban_after_ignored": (1, 1, "refusals inside a told wait that ban for that wait"),
    "limits.ban_duration": ("60s", "5m", "how long the kernel drops a banned source's SYNs"),
    "limits.ban_spread": (0.5, 0.5, "each ban lasts up to this fraction longer, per source"),
    "limits.max_bans": (10000, 10000, "sources banned at once"),
    "limits.silent_drop_after": (50, 50, "silent connections within 10 s that start the drop"),
    "limits.silent_drop_duration": ("60s", "60s", "how long the kernel drops bare handshakes"),
    "udp.cookie_window": ("30s", "30s", "a UDP cookie lives one to two windows"),
    "udp.max_datagram_bytes": (512, 512, "larger request datagrams: ERROR too_long"),
    "udp.unproven_per_source": ("1200/minute", "10/minute", "cookieless answers per source"),
    "udp.unproven_global": ("500/second", "500/second", "answers to cookieless datagrams in total"),
}
_TUNABLE = {key.split(".")[1]: key for key in CONSTANTS}


def _removed(key: str) -> str:
    classroom, internet, what = (f'"{v}"' if isinstance(v, str) else v for v in CONSTANTS[key])
    if classroom == internet:
        return f"{key}: removed: a constant now, {internet} in every limits.profile ({what[1:-1]})"
    return (
        f'{key}: removed: set limits.profile = "internet" ({internet}) or "classroom" '
        f"({classroom}) ({what[1:-1]})"
    )


def _with_profile(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The file's sections with the profile's constants (and [tuning]) filled in."""
    data = {name: dict(v) if isinstance(v, dict) else v for name, v in data.items()}
    problems: list[str] = []
    tuning = data.pop("tuning", {})
    if not isinstance(tuning, dict):
        problems.append(f"tuning: expected a [tuning] table, got {type(tuning).__name__}")
        tuning = {}
    for name in tuning:
        if name not in _TUNABLE:
            problems.append(f"tuning.{name}: unknown key (expected a profile constant)")
    limits = data.get("limits")
    profile = limits.get("profile") if isinstance(limits, dict) else None
    column = PROFILES.index(profile) if profile in PROFILES else 1
    server = data.setdefault("server", {})
    if isinstance(server, dict):  # a key whose default is the profile's (docs/deployment.md)
        server.setdefault("workers", (1, 0)[column])
    for key, values in CONSTANTS.items():
        section, name = key.split(".")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        if name in table:
            problems.append(_removed(key))
        table[name] = tuning.get(name, values[column])
    return data, problems


def _choices(key: str) -> tuple[str, ...]:
    section, _, name = key.partition(".")
    for f in msgspec.structs.fields(_SECTIONS.get(section, _Section)):
        if f.encode_name == name and get_origin(f.type) is Literal:
            return get_args(f.type)
    return ()


def _problem(err: msgspec.ValidationError, prefix: str = "") -> str:
    text = str(err)
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", text, re.S)
    message, path = (m.group(1), m.group(2)) if m else (text, "")
    key = ".".join(p for p in (prefix, path) if p)
    unknown = re.match(r"Object contains unknown field `(.*)`", message)
    if unknown:
        key = ".".join(p for p in (key, unknown.group(1)) if p)
        return f"{key}: unknown key"
    bad = re.match(r"Invalid enum value (.*)", message)
    if bad and _choices(key):
        message = f"expected one of {', '.join(f'{c!r}' for c in _choices(key))}, got {bad[1]}"
        message = message.replace("'", '"')
    if key in CONSTANTS:  # only [tuning] can set a constant wrong
        key = f"tuning.{key.split('.')[1]}"
    return f"{key}: {message}" if key else message


def _section_problems(name: str, value: Any) -> tuple[list[str], dict[str, Any] | None]:
    """Every type problem in one section, and the section with the bad keys left out.

    msgspec stops at the first problem, so each key (and each list item) is
    retried on its own; the cleaned section lets the semantic checks run too.
    """
    typ = _SECTIONS.get(name)
    if typ is None:
        return [f"{name}: unknown section (expected one of {', '.join(_SECTIONS)})"], None
    if not isinstance(value, dict):
        return [f"{name}: expected a [{name}] table, got {type(value).__name__}"], None
    problems: list[str] = []
    clean: dict[str, Any] = {}
    for key, item in value.items():
        found = _key_problems(typ, name, key, item)
        problems += found
        if not found:
            clean[key] = item
    return problems, clean


def _key_problems(typ: type, section: str, key: str, item: Any) -> list[str]:
    try:
        msgspec.convert({key: item}, typ, dec_hook=_dec_hook)
        return []
    except msgspec.ValidationError as e:
        first = _problem(e, section)
    if not isinstance(item, list) or len(item) < 2:
        return [first]
    problems = []
    for i, element in enumerate(item):
        try:
            msgspec.convert({key: [element]}, typ, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:
            problems.append(_problem(e, section).replace(f"{key}[0]", f"{key}[{i}]", 1))
    return problems or [first]


def _semantic_problems(cfg: Config) -> list[str]:
    """Checks msgspec's types cannot express: one key against another, addresses."""
    problems: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(
                f"{'tuning.' + key.split('.')[1] if key in CONSTANTS else key}: {message}"
            )

    need(
        cfg.auth.mode != "token" or bool(cfg.auth.secret or cfg.auth.secret_file),
        "auth.secret",
        'auth.mode = "token" needs auth.secret or auth.secret_file',
    )
    need(bool(cfg.server.listen), "server.listen", "expected at least one HOST:PORT")
    for i, spec in enumerate(cfg.server.listen):
        why = _hostport_problem(spec)
        need(why is None, f"server.listen[{i}]", why or "")
    if cfg.server.admin != "off":
        why = _hostport_problem(cfg.server.admin)
        need(why is None, "server.admin", (why or "") + ' (or "off")')
    need(
        cfg.protocol.quiet_period < cfg.protocol.read_deadline,
        "protocol.quiet_period",
        "expected a duration > 0 and shorter than protocol.read_deadline",
    )
    need(bool(cfg.policy.ports), "policy.ports", "expected at least one port range")
    need(
        cfg.limits.refusal_delay <= cfg.limits.max_refusal_delay,
        "limits.max_refusal_delay",
        "expected a duration from limits.refusal_delay to 60s",
    )
    return problems


def _hostport_problem(spec: str) -> str | None:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return f"expected HOST:PORT like 0.0.0.0:9000 or [::]:9000, got {spec!r}"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"expected an IP address before the port, got {spec!r}"
    return None


_SECTIONS: dict[str, type] = {f.encode_name: f.type for f in msgspec.structs.fields(Config)}  # type: ignore[misc]


def validate(cfg: Config) -> Config:
    """Raise ConfigError listing every semantic problem; return cfg when valid."""
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a TOML-shaped dict; raise ConfigError naming the key of every problem."""
    data, removed = _with_profile(data)
    try:
        cfg = msgspec.convert(data, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        problems: list[str] = []
        clean: dict[str, Any] = {}
        for name, value in data.items():
            found, section = _section_problems(name, value)
            problems += found
            if section is not None:
                clean[name] = section
        try:  # what is left still gets the semantic checks, so one run lists everything
            problems += _semantic_problems(msgspec.convert(clean, Config, dec_hook=_dec_hook))
        except msgspec.ValidationError:
            pass
        raise ConfigError(removed + (problems or [_problem(e)])) from None
    problems = removed + _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def loads(text: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"TOML syntax: {e}"]) from None
    return from_dict(data)


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    cfg = loads(text)
    roster = cfg.class_.roster
    if roster and not os.path.isabs(roster):
        where = os.path.join(os.path.dirname(os.path.abspath(path)), roster)
        cfg = msgspec.structs.replace(cfg, class_=ClassConfig(roster=where))
    return cfg


def roster_text(cfg: Config) -> tuple[str, str] | None:
    """(path, text) of the class roster file, None without one; ConfigError names the file."""
    path = cfg.class_.roster
    if not path:
        return None
    limit = 4 * 1024 * 1024  # characters: thousands of students, never a whole row cut off
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(limit + 1)
        if len(text) > limit:
            raise ConfigError([f"class.roster: {path}: larger than 4 MiB; is it the roster?"])
        return path, text
    except OSError as e:
        raise ConfigError([f"class.roster: cannot read {path}: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"class.roster: {path}: not UTF-8 text"]) from None


def auth_secret(cfg: Config) -> bytes:
    """The token secret: auth.secret, or the first line of auth.secret_file."""
    if cfg.auth.secret:
        return cfg.auth.secret.encode()
    if cfg.auth.secret_file:
        try:
            with open(cfg.auth.secret_file, "rb") as f:
                return f.read().strip()
        except OSError as e:
            raise ConfigError(
                [f"auth.secret_file: cannot read {cfg.auth.secret_file}: {e.strerror}"]
            ) from None
    return b""
