"""Configuration: TOML -> validated, frozen objects.

Every key and its default: config/registry.example.toml; the profiles'
constants: docs/limits.md. msgspec checks types, ranges (``Meta``) and
choices (``Literal``) and rejects unknown keys; the values with units or
addresses parse themselves; every problem is reported with its key's path.
The defence constants no operator sets are not keys: ``limits.profile`` fills
them in, a file that sets one is told its replacement, and ``[tuning]``
overrides them for tests and benchmarks (a ban of 2 s, not 5 minutes).
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
from registry.model import CIDR, Duration, PortRange, Rate


def _bounded(positive: bool, most: float, expect: str) -> type[Duration]:
    return type("Duration", (Duration,), {"positive": positive, "most": most, "expect": expect})


Positive = _bounded(True, math.inf, "expected a duration > 0")
UpToADay = _bounded(True, 86400.0, "expected a duration > 0 and at most 24h")
UpToAMinute = _bounded(False, 60.0, "expected a duration from 0 to 60s")
# TCP_DEFER_ACCEPT: the kernel's schedule ends at 127 s
DeferAccept = _bounded(False, 120.0, "expected a duration from 0 (off) to 120s")


class HostPort(str):
    """``HOST:PORT`` with a literal IP (``[::]:9000`` for IPv6); ``off``: may be "off"."""

    off = False

    @classmethod
    def parse(cls, value: object) -> HostPort:
        if not isinstance(value, str):
            raise TypeError(f"expected a HOST:PORT string, got {type(value).__name__}")
        if cls.off and value == "off":
            return cls(value)
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            why = "expected HOST:PORT like 0.0.0.0:9000 or [::]:9000"
        else:
            try:
                ipaddress.ip_address(host[1:-1] if host[:1] + host[-1:] == "[]" else host)
                return cls(value)
            except ValueError:
                why = "expected an IP address before the port"
        raise ValueError(f"{why}, got {value!r}" + (' (or "off")' if cls.off else ""))


class AdminAddress(HostPort):
    off = True


def _dec_hook(typ: type, value: Any) -> Any:
    if isinstance(typ, type) and issubclass(typ, Duration | Rate | PortRange | CIDR | HostPort):
        return typ.parse(value)
    raise NotImplementedError(typ)


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


Count = Annotated[int, msgspec.Meta(ge=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NotEmpty = msgspec.Meta(min_length=1)


# Fields marked "profile" are limits.profile's constants (CONSTANTS below), not
# keys; their defaults here are the "internet" profile's.


class ServerConfig(_Section):
    listen: Annotated[tuple[HostPort, ...], NotEmpty] = ("0.0.0.0:9000", "[::]:9000")  # type: ignore[assignment]
    udp: bool = True
    admin: AdminAddress = "127.0.0.1:9100"  # type: ignore[assignment]
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
    ports: Annotated[tuple[PortRange, ...], NotEmpty] = (PortRange(1024, 65535),)
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


class UdpConfig(_Section):  # all profile constants
    cookie_window: Positive = Positive(30.0)
    max_datagram_bytes: Annotated[int, msgspec.Meta(ge=64, le=65507)] = 512
    unproven_per_source: Rate = Rate(10, 60.0)
    unproven_global: Rate = Rate(500, 1.0)


class ClassConfig(_Section):
    roster: str = ""  # CSV (docs/grading.md), relative to the config file's directory


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


# limits.profile's constants, (classroom, internet), each explained in docs/limits.md.
# "classroom": a class on one LAN, often behind one NAT address that a ban or a fine
# would lock out (config/lab.toml). "internet": a registry anyone can reach; the
# default, because a registry whose operator chose nothing may well be exposed.
PROFILES = ("classroom", "internet")
CONSTANTS: dict[str, tuple[Any, Any]] = {
    "server.defer_accept": ("30s", "30s"),
    "protocol.quiet_period": ("250ms", "250ms"),
    "callback.max_response_bytes": (4096, 1024),
    "policy.resolve_timeout": ("2s", "2s"),
    "ratelimit.errors_global": ("200/second", "200/second"),
    "ratelimit.error_fine": (0, 30),
    "limits.refusal_delay": ("500ms", "500ms"),
    "limits.max_refusal_delay": ("5s", "5s"),
    "limits.max_refusals_held": (8192, 8192),
    "limits.ban_after": (0, 10),
    "limits.ban_after_ignored": (1, 1),
    "limits.ban_duration": ("60s", "5m"),
    "limits.ban_spread": (0.5, 0.5),
    "limits.max_bans": (10000, 10000),
    "limits.silent_drop_after": (50, 50),
    "limits.silent_drop_duration": ("60s", "60s"),
    "udp.cookie_window": ("30s", "30s"),
    "udp.max_datagram_bytes": (512, 512),
    "udp.unproven_per_source": ("1200/minute", "10/minute"),
    "udp.unproven_global": ("500/second", "500/second"),
}
_TUNABLE = {key.split(".")[1]: key for key in CONSTANTS}


def _removed(key: str) -> str:
    classroom, internet = (f'"{v}"' if isinstance(v, str) else v for v in CONSTANTS[key])
    if classroom == internet:
        return (
            f"{key}: removed: a constant now, {internet} in every limits.profile (docs/limits.md)"
        )
    return (
        f'{key}: removed: set limits.profile = "internet" ({internet}) or "classroom" '
        f"({classroom}) (docs/limits.md)"
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
    if message == "Expected `array` of length >= 1":
        message = "expected at least one"
    bad = re.match(r"Invalid enum value (.*)", message)
    if bad and _choices(key):
        message = f"expected one of {', '.join(f'{c!r}' for c in _choices(key))}, got {bad[1]}"
        message = message.replace("'", '"')
    if key in CONSTANTS:  # only [tuning] can set a constant wrong
        key = f"tuning.{key.split('.')[1]}"
    return f"{key}: {message}" if key else message


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
    """What msgspec's types cannot say: one key against another."""
    problems = []
    if cfg.auth.mode == "token" and not (cfg.auth.secret or cfg.auth.secret_file):
        problems.append('auth.secret: auth.mode = "token" needs auth.secret or auth.secret_file')
    if cfg.protocol.quiet_period >= cfg.protocol.read_deadline:  # [tuning] sets quiet_period
        problems.append(
            "tuning.quiet_period: expected a duration > 0 and shorter than protocol.read_deadline"
        )
    if cfg.limits.refusal_delay > cfg.limits.max_refusal_delay:
        problems.append(
            "tuning.max_refusal_delay: expected a duration from limits.refusal_delay to 60s"
        )
    return problems


_SECTIONS: dict[str, type] = {f.encode_name: f.type for f in msgspec.structs.fields(Config)}  # type: ignore[misc]


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a TOML-shaped dict; raise ConfigError naming the key of every problem.

    msgspec stops at its first problem, so each key (and each list item) is checked on
    its own; the good keys still get the checks across keys: one run lists everything.
    """
    data, problems = _with_profile(data)
    clean: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        typ = _SECTIONS.get(name)
        if typ is None:
            problems.append(f"{name}: unknown section (expected one of {', '.join(_SECTIONS)})")
        elif not isinstance(value, dict):
            problems.append(f"{name}: expected a [{name}] table, got {type(value).__name__}")
        else:
            clean[name] = {}
            for key, item in value.items():
                found = _key_problems(typ, name, key, item)
                problems += found
                if not found:
                    clean[name][key] = item
    cfg = msgspec.convert(clean, Config, dec_hook=_dec_hook)
    problems += _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def loads(text: str, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """The config in TOML ``text``, with ``overrides`` (the command line's) over its keys."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"TOML syntax: {e}"]) from None
    for name, values in (overrides or {}).items():
        if values and isinstance(data.get(name, {}), dict):
            data[name] = {**data.get(name, {}), **values}
    return from_dict(data)


def read_text(path: str, key: str = "", limit: int = 1 << 30) -> str:
    """The UTF-8 text of ``path``; ConfigError names the key (if any), the file and why."""
    where = f"{key}: {path}" if key else path
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(limit + 1)
    except OSError as e:
        raise ConfigError([f"{where}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: not UTF-8 text"]) from None
    if len(text) > limit:  # never parse a file cut mid-row
        raise ConfigError([f"{where}: larger than {limit >> 20} MiB; is it the right file?"])
    return text


def load(path: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """The config file at ``path`` (none: the defaults), with ``overrides``; ConfigError."""
    cfg = loads(read_text(path) if path is not None else "", overrides)
    if path is None:
        return cfg
    roster = cfg.class_.roster
    if roster and not os.path.isabs(roster):
        where = os.path.join(os.path.dirname(os.path.abspath(path)), roster)
        cfg = msgspec.structs.replace(cfg, class_=ClassConfig(roster=where))
    return cfg


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
