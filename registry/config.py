"""Configuration: TOML -> validated, frozen objects.

msgspec does the type checking and rejects unknown keys; the few value types
with units (durations, rates, port ranges, networks) are parsed by the small
functions below, whose errors msgspec reports with the key's path. An empty
file is a valid config: every field has the default documented in
``config/registry.example.toml``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from typing import Any

import msgspec

from registry.errors import ConfigError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour)\s*$")


class Duration(float):
    """Seconds; written in TOML as ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"30d"`` or a number."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise TypeError(f'expected a duration like "5s", got {value!r}')
        if isinstance(value, int | float):
            if value < 0:
                raise ValueError(f"expected a non-negative duration, got {value!r}")
            return cls(value)
        if isinstance(value, str):
            m = _DURATION_RE.match(value)
            if m:
                return cls(float(m.group(1)) * _UNITS[m.group(2)])
            raise ValueError(f'expected a duration like "250ms", "5s", "2m", got "{value}"')
        raise TypeError(f'expected a duration like "5s", got {type(value).__name__}')


class Rate:
    """``"N/unit"`` with unit second, minute or hour: N events per period."""

    __slots__ = ("count", "period")

    def __init__(self, count: int, period: float) -> None:
        self.count = count
        self.period = period

    @classmethod
    def parse(cls, value: object) -> Rate:
        if not isinstance(value, str):
            raise TypeError(f'expected "N/unit", got {value!r}')
        m = _RATE_RE.match(value)
        if not m:
            raise ValueError(f'expected "N/unit", got "{value}"')
        return cls(int(m.group(1)), _RATE_UNITS[m.group(2)])

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rate) and (self.count, self.period) == (other.count, other.period)

    def __hash__(self) -> int:
        return hash((self.count, self.period))

    def __repr__(self) -> str:
        unit = {v: k for k, v in _RATE_UNITS.items()}.get(self.period, f"{self.period}s")
        return f"Rate('{self.count}/{unit}')"


class PortRange:
    """``"1024-65535"`` or ``"15000"``: an inclusive range of TCP/UDP ports."""

    __slots__ = ("low", "high")

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high

    @classmethod
    def parse(cls, value: object) -> PortRange:
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and re.fullmatch(r"\s*\d{1,5}\s*(-\s*\d{1,5}\s*)?", value):
            parts = [int(p) for p in value.split("-")]
            low, high = parts[0], parts[-1]
        else:
            raise ValueError(f'expected a port range like "10000-20000", got {value!r}')
        if not (1 <= low <= high <= 65535):
            raise ValueError(f"expected ports within 1-65535 with low <= high, got {value!r}")
        return cls(low, high)

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortRange) and (self.low, self.high) == (other.low, other.high)

    def __hash__(self) -> int:
        return hash((self.low, self.high))

    def __repr__(self) -> str:
        return f"PortRange('{self.low}-{self.high}')"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CIDR:
    """A ``"10.0.0.0/8"`` network from the config; ``.network`` is the ipaddress object.

    A wrapper because msgspec allows one custom type per union.
    """

    __slots__ = ("network",)

    def __init__(self, network: Network) -> None:
        self.network = network

    @property
    def version(self) -> int:
        return self.network.version

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address) and (
            addr.version == self.network.version and addr in self.network
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CIDR) and self.network == other.network

    def __hash__(self) -> int:
        return hash(self.network)

    def __str__(self) -> str:
        return str(self.network)

    def __repr__(self) -> str:
        return f"CIDR('{self.network}')"


def _parse_network(value: object) -> CIDR:
    if not isinstance(value, str):
        raise TypeError(f'expected a CIDR network like "10.0.0.0/8", got {value!r}')
    try:
        return CIDR(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as e:
        raise ValueError(
            f'expected a CIDR network like "10.0.0.0/8", got "{value}" ({e})'
        ) from None


def _dec_hook(typ: type, value: Any) -> Any:
    if typ is Duration:
        return Duration.parse(value)
    if typ is Rate:
        return Rate.parse(value)
    if typ is PortRange:
        return PortRange.parse(value)
    if typ is CIDR:
        return _parse_network(value)
    raise NotImplementedError(typ)


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerConfig(_Section):
    listen: tuple[str, ...] = ("0.0.0.0:9000", "[::]:9000")
    udp: bool = True
    admin: str = "127.0.0.1:9100"  # "off" disables the admin endpoint
    admin_token: str = ""  # bearer token for the admin endpoint; empty: none
    db: str = "registry.db"
    grace_period: Duration = Duration(10.0)
    backlog: int = 4096
    # TCP_DEFER_ACCEPT (Linux): a connection that sends nothing stays in the kernel
    # this long (rounded up to 1, 3, 7, 15, 31, 63 or 127 s) before accept() sees it,
    # so silent stalls cost no descriptor and no work. 0: off.
    defer_accept: Duration = Duration(30.0)
    # Registry processes sharing the registration ports, each source steered to one
    # (docs/architecture.md "Workers"); 0: one per core.
    workers: int = 1


class LogConfig(_Section):
    format: str = "auto"  # auto | json | console
    level: str = "info"


class ProtocolConfig(_Section):
    max_request_bytes: int = 512
    read_deadline: Duration = Duration(5.0)
    quiet_period: Duration = Duration(0.25)
    write_timeout: Duration = Duration(5.0)


class CallbackConfig(_Section):
    connect_timeout: Duration = Duration(3.0)
    verify_timeout: Duration = Duration(2.0)
    max_response_bytes: int = 4096
    require_verification: bool = False
    greeting: str = "Hello from the instructor's Registry Server!"


class PolicyConfig(_Section):
    mode: str = "strict"  # strict | nat-observed | advertised
    ports: tuple[PortRange, ...] = (PortRange(1024, 65535),)
    allow_networks: tuple[CIDR, ...] = ()  # empty: any address the mode permits
    deny_networks: tuple[CIDR, ...] = ()
    report_only_deny_networks: tuple[CIDR, ...] = ()
    allow_hostnames: bool = False
    resolve_timeout: Duration = Duration(2.0)


class AuthConfig(_Section):
    mode: str = "none"  # none | token
    secret: str = ""
    secret_file: str = ""


class RateLimitConfig(_Section):
    per_source: Rate = Rate(30, 60.0)
    per_target: Rate = Rate(30, 60.0)
    per_target_port: Rate = Rate(10, 60.0)
    global_: Rate = msgspec.field(default=Rate(100, 1.0), name="global")
    ipv6_prefix: int = 64
    max_entries: int = 100_000
    # Protocol errors (junk, stalls) the registry records before it is "under
    # pressure"; beyond it, until errors have stayed under this rate for a whole
    # burst, each further error empties its source's bucket and fines it
    # error_fine tokens more, into debt (at most one period's worth). 0: never.
    errors_global: Rate = Rate(200, 1.0)
    error_fine: int = 30


class LimitsConfig(_Section):
    max_connections: int = 8192
    max_connections_per_source: int = 32
    max_callbacks_in_flight: int = 256
    max_callback_queue: int = 1024
    refusal_delay: Duration = Duration(0.5)  # a source's first refusal is answered this late
    max_refusal_delay: Duration = Duration(5.0)  # ... doubling per repeat, up to this
    max_refusals_held: int = 8192  # refused connections waiting for their answer
    ban_after: int = 20  # refusals of one source within 10 s that ban it; 0: never ban
    # refusals within 10 s of a source told to wait longer than max_refusal_delay
    # (in debt after a fine) that ban it for that wait; 0: this rule off. 1: the
    # fined error's line and that refusal both told it the wait (docs/limits.md)
    ban_after_ignored: int = 1
    ban_duration: Duration = Duration(60.0)  # how long the kernel drops a banned source's SYNs
    # each ban lasts up to this fraction longer, fixed per source, so that sources
    # banned together are not let back together (0: exactly ban_duration)
    ban_spread: float = 0.5
    max_bans: int = 10000  # sources banned at once
    # connections that send nothing before their read deadline, within 10 s, that
    # make the kernel drop every bare handshake ACK for silent_drop_duration: a
    # connection is then made only by its first bytes (0: never)
    silent_drop_after: int = 50
    silent_drop_duration: Duration = Duration(60.0)
    ban_exempt_networks: tuple[CIDR, ...] = ()  # never banned (a class's shared NAT address)


class StoreConfig(_Section):
    retention: Duration = Duration(0.0)  # 0: keep forever


class UdpConfig(_Section):
    """UDP registrations (enabled by ``server.udp``): stateless cookies, datagram cap."""

    cookie_window: Duration = Duration(30.0)  # a cookie lives 1-2 windows; secret rotates each
    max_datagram_bytes: int = 512  # larger request datagrams: ERROR too_long
    # Answers to datagrams without a valid cookie (ERROR, COOKIE), per source
    # (IPv6: per ratelimit.ipv6_prefix network) and in total; beyond: dropped
    # unanswered. Small, so a reply loop through any reflector dies within a few
    # exchanges; a UDP registration costs two (COOKIE pad=N, then the cookie).
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


def _problem(err: msgspec.ValidationError, prefix: str = "") -> str:
    text = str(err)
    m = re.match(r"^(.*) - at `\$\.?(.*)`$", text, re.S)
    message, path = (m.group(1), m.group(2)) if m else (text, "")
    key = ".".join(p for p in (prefix, path) if p)
    unknown = re.match(r"Object contains unknown field `(.*)`", message)
    if unknown:
        key = ".".join(p for p in (key, unknown.group(1)) if p)
        return f"{key}: unknown key"
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
    """Checks msgspec's types cannot express: enums, ranges, addresses."""
    problems: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    choice = "expected one of {}, got {!r}"
    need(
        cfg.log.format in ("auto", "json", "console"),
        "log.format",
        choice.format('"auto", "json", "console"', cfg.log.format),
    )
    need(
        cfg.log.level in ("debug", "info", "warning", "error", "critical"),
        "log.level",
        choice.format('"debug", "info", "warning", "error", "critical"', cfg.log.level),
    )
    need(
        cfg.policy.mode in POLICY_MODES,
        "policy.mode",
        choice.format(", ".join(f'"{m}"' for m in POLICY_MODES), cfg.policy.mode),
    )
    need(
        cfg.auth.mode in ("none", "token"),
        "auth.mode",
        choice.format('"none", "token"', cfg.auth.mode),
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
    need(bool(cfg.server.db), "server.db", "expected a file path")
    need(
        0 <= cfg.server.workers <= 64,
        "server.workers",
        f"expected 0 (one per core) to 64, got {cfg.server.workers}",
    )
    need(
        1 <= cfg.server.backlog <= 65535,
        "server.backlog",
        f"expected 1-65535, got {cfg.server.backlog}",
    )
    need(
        cfg.server.defer_accept <= 120,
        "server.defer_accept",
        "expected a duration from 0 (off) to 120s",
    )
    need(
        32 <= cfg.protocol.max_request_bytes <= 65536,
        "protocol.max_request_bytes",
        f"expected 32-65536, got {cfg.protocol.max_request_bytes}",
    )
    need(cfg.protocol.read_deadline > 0, "protocol.read_deadline", "expected a duration > 0")
    need(cfg.protocol.write_timeout > 0, "protocol.write_timeout", "expected a duration > 0")
    need(
        0 < cfg.protocol.quiet_period < cfg.protocol.read_deadline,
        "protocol.quiet_period",
        "expected a duration > 0 and shorter than protocol.read_deadline",
    )
    need(cfg.callback.connect_timeout > 0, "callback.connect_timeout", "expected a duration > 0")
    need(cfg.callback.max_response_bytes >= 64, "callback.max_response_bytes", "expected >= 64")
    need(bool(cfg.policy.ports), "policy.ports", "expected at least one port range")
    need(0 <= cfg.ratelimit.ipv6_prefix <= 128, "ratelimit.ipv6_prefix", "expected 0-128")
    for key in ("max_entries",):
        need(getattr(cfg.ratelimit, key) >= 1, f"ratelimit.{key}", "expected >= 1")
    for key in ("max_connections", "max_connections_per_source", "max_callbacks_in_flight"):
        need(getattr(cfg.limits, key) >= 1, f"limits.{key}", "expected >= 1")
    need(cfg.limits.max_callback_queue >= 0, "limits.max_callback_queue", "expected >= 0")
    need(cfg.limits.max_refusals_held >= 0, "limits.max_refusals_held", "expected >= 0")
    need(cfg.limits.ban_after >= 0, "limits.ban_after", "expected >= 0 (0: never ban)")
    need(
        cfg.limits.ban_after_ignored >= 0,
        "limits.ban_after_ignored",
        "expected >= 0 (0: this rule off)",
    )
    need(
        0 < cfg.limits.ban_duration <= 86400,
        "limits.ban_duration",
        "expected a duration > 0 and at most 24h",
    )
    need(1 <= cfg.limits.max_bans <= 100_000, "limits.max_bans", "expected 1-100000")
    need(0 <= cfg.limits.ban_spread <= 1, "limits.ban_spread", "expected 0-1")
    need(cfg.limits.silent_drop_after >= 0, "limits.silent_drop_after", "expected >= 0 (0: never)")
    need(
        0 < cfg.limits.silent_drop_duration <= 86400,
        "limits.silent_drop_duration",
        "expected a duration > 0 and at most 24h",
    )
    need(
        cfg.limits.refusal_delay <= cfg.limits.max_refusal_delay <= 60,
        "limits.max_refusal_delay",
        "expected a duration from limits.refusal_delay to 60s",
    )
    need(cfg.udp.cookie_window > 0, "udp.cookie_window", "expected a duration > 0")
    need(
        64 <= cfg.udp.max_datagram_bytes <= 65507,
        "udp.max_datagram_bytes",
        f"expected 64-65507, got {cfg.udp.max_datagram_bytes}",
    )
    for key in ("unproven_per_source", "unproven_global"):
        need(getattr(cfg.udp, key).count >= 1, f"udp.{key}", 'expected N >= 1 in "N/unit"')
    need(cfg.ratelimit.error_fine >= 0, "ratelimit.error_fine", "expected >= 0 (0: never fine)")
    for key in ("per_source", "per_target", "per_target_port", "global_", "errors_global"):
        rate = getattr(cfg.ratelimit, key)
        need(rate.count >= 1, f"ratelimit.{key.rstrip('_')}", 'expected N >= 1 in "N/unit"')
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


POLICY_MODES = ("strict", "nat-observed", "advertised")
_SECTIONS: dict[str, type] = {f.encode_name: f.type for f in msgspec.structs.fields(Config)}  # type: ignore[misc]


def validate(cfg: Config) -> Config:
    """Raise ConfigError listing every semantic problem; return cfg when valid."""
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a TOML-shaped dict; raise ConfigError naming the key of every problem."""
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
        raise ConfigError(problems or [_problem(e)]) from None
    return validate(cfg)


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
    try:
        with open(path, encoding="utf-8") as f:
            return path, f.read(4 * 1024 * 1024)
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


def summary(cfg: Config) -> str:
    """A few lines an operator can eyeball after check-config."""
    rl, lim, pol = cfg.ratelimit, cfg.limits, cfg.policy
    ports = ", ".join(f"{p.low}-{p.high}" for p in pol.ports)
    lines = [
        "config OK",
        f"  listen      {', '.join(cfg.server.listen)} (udp {'on' if cfg.server.udp else 'off'})",
        f"  admin       {cfg.server.admin}",
        f"  db          {cfg.server.db}",
        f"  policy      mode={pol.mode} ports={ports} hostnames={'on' if pol.allow_hostnames else 'off'}"
        f" allow={len(pol.allow_networks)} deny={len(pol.deny_networks)}",
        f"  auth        {cfg.auth.mode}",
        f"  ratelimit   per_source={rl.per_source.count}/{rl.per_source.period:g}s"
        f" per_target={rl.per_target.count}/{rl.per_target.period:g}s"
        f" global={rl.global_.count}/{rl.global_.period:g}s",
        f"  limits      connections={lim.max_connections} per_source={lim.max_connections_per_source}"
        f" callbacks={lim.max_callbacks_in_flight}+{lim.max_callback_queue} queued",
        f"  bans        after {lim.ban_after} refusals in 10s, for {lim.ban_duration:g}s"
        + (
            f"; after {lim.ban_after_ignored} ignored wait"
            f"{'' if lim.ban_after_ignored == 1 else 's'}, for the wait"
            if lim.ban_after_ignored
            else ""
        )
        if lim.ban_after
        else "  bans        off",
        f"  silent      after {lim.silent_drop_after} in 10s, the kernel keeps them"
        f" for {lim.silent_drop_duration:g}s"
        if lim.silent_drop_after
        else "  silent      never dropped",
    ]
    return "\n".join(lines)
