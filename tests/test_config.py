"""Configuration: the documented example equals the defaults, the shipped
profiles are valid, and every kind of mistake is reported naming its key,
both by ``config.loads`` and by ``registry check-config`` (the real executable
for the shipped files and one bad file; the console script's own ``main()``,
in this process, for the table of mistakes)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import msgspec
import pytest

from registry import cli
from registry import config as config_mod
from registry.config import Config
from registry.errors import ConfigError
from registry.model import Rate
from tests.support import ROOT, exe

CONFIG_DIR = ROOT / "config"
EXAMPLE = CONFIG_DIR / "registry.example.toml"
PROFILES = ("lab.toml", "internet.toml", "nat-demo.toml")


def _keys(cfg_type: type = Config) -> list[tuple[str, str, str]]:
    """(section, TOML key, attribute) for every key of every section: not the
    profile's constants, which a file cannot set."""
    out = []
    for section in msgspec.structs.fields(cfg_type):
        for f in msgspec.structs.fields(section.type):
            if f"{section.encode_name}.{f.encode_name}" not in config_mod.CONSTANTS:
                out.append((section.encode_name, f.encode_name, f.name))
    return out


def _ids(keys: list[tuple[str, str, str]]) -> list[str]:
    return [f"{s}.{k}" for s, k, _ in keys]


KEYS = _keys()


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe("registry"), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def check_config_here(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``registry check-config PATH`` through ``cli.main``, what the executable runs:
    its exit status and stdout."""
    with pytest.raises(SystemExit) as done:
        cli.main(["check-config", str(path)])
    return done.value.code, capsys.readouterr().out  # type: ignore[return-value]


# --- the example documents every key, with its default ------------------------


@pytest.mark.parametrize(("section", "key", "attr"), KEYS, ids=_ids(KEYS))
def test_example_value_equals_default(section: str, key: str, attr: str) -> None:
    loaded = config_mod.load(str(EXAMPLE))
    default = Config()
    # a section's attribute may differ from its TOML name ([class] is class_)
    name = next(f.name for f in msgspec.structs.fields(Config) if f.encode_name == section)
    assert getattr(getattr(loaded, name), attr) == getattr(getattr(default, name), attr)


def test_example_loads_to_exactly_the_defaults() -> None:
    assert config_mod.load(str(EXAMPLE)) == Config()


@pytest.mark.parametrize(("section", "key", "attr"), KEYS, ids=_ids(KEYS))
def test_every_key_is_written_and_commented_in_the_example(
    section: str, key: str, attr: str
) -> None:
    """Drift guard: a key added to config.py must be added (with a comment) here."""
    data = tomllib.loads(EXAMPLE.read_text())
    assert key in data.get(section, {}), f"[{section}] {key} missing from {EXAMPLE.name}"
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index(f"[{section}]")
    at = next(
        i for i in range(start + 1, len(lines)) if re.match(rf"{re.escape(key)}\s*=", lines[i])
    )
    assert lines[at - 1].startswith("#"), f"[{section}] {key}: no comment line right above it"


def test_example_has_no_section_config_lacks() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == {s for s, _, _ in KEYS}


# --- shipped profiles ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [*PROFILES, "registry.example.toml"])
def test_shipped_profile_passes_check_config(name: str) -> None:
    result = check_config(CONFIG_DIR / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("config OK\n")
    assert "listen" in result.stdout and "ratelimit" in result.stdout
    bans = next(line for line in result.stdout.splitlines() if line.startswith("  bans "))
    limits = config_mod.load(str(CONFIG_DIR / name)).limits
    assert f"  profile     {limits.profile} (docs/limits.md)\n" in result.stdout
    ban_after = limits.ban_after
    assert bans.endswith(" off") if ban_after == 0 else f"after {ban_after} refusals" in bans
    if ban_after and limits.ban_after_ignored:
        ignored = limits.ban_after_ignored
        assert f"after {ignored} ignored wait{'' if ignored == 1 else 's'}," in bans, bans
    silent = next(line for line in result.stdout.splitlines() if line.startswith("  silent "))
    assert f"after {limits.silent_drop_after} in 10s" in silent, silent


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert config_mod.load(str(path)) == Config()
    result = check_config(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("config OK\n")
    assert "0.0.0.0:9000" in result.stdout


def test_profiles_say_what_they_promise() -> None:
    lab = config_mod.load(str(CONFIG_DIR / "lab.toml"))
    internet = config_mod.load(str(CONFIG_DIR / "internet.toml"))
    nat = config_mod.load(str(CONFIG_DIR / "nat-demo.toml"))
    default = Config()
    assert [(p.low, p.high) for p in lab.policy.ports] == [(10000, 20000)]
    assert lab.policy.mode == "strict"
    # a class behind one NAT address: room for 300 students a minute from one source
    assert lab.ratelimit.per_source.per_second * 60 >= 300
    assert lab.limits.max_connections_per_source >= 300
    assert internet.policy.mode == "strict" and internet.auth.mode == "token"
    assert internet.ratelimit.per_source.per_second < default.ratelimit.per_source.per_second
    assert internet.limits.max_connections_per_source < default.limits.max_connections_per_source
    # a hostile network: one return inside a told wait bans (docs/benchmarks.md);
    # the profile states its defence although it is the default, so it cannot drift
    assert internet.limits.ban_after_ignored == 1
    assert 'profile = "internet"' in (CONFIG_DIR / "internet.toml").read_text()
    # a class behind one NAT address is never banned or fined together
    for cfg in (lab, nat):
        assert cfg.limits.profile == "classroom"
        assert cfg.limits.ban_after == 0 and cfg.ratelimit.error_fine == 0
    assert nat.policy.mode == "nat-observed"
    for cfg in (lab, internet, nat):
        assert cfg.server.admin.startswith("127.0.0.1:"), "admin must stay on loopback"


# --- every mistake names its key -----------------------------------------------

# (id, TOML text, the problem lines expected: each a regex matched at a line's start)
BAD = [
    ("toml-syntax", "[server\nlisten = []\n", [r"TOML syntax: .*line 1"]),
    ("toml-duplicate", "[server]\ndb = 'a'\ndb = 'b'\n", [r"TOML syntax: .*"]),
    ("type-int", '[limits]\nmax_connections = "many"\n', [r"limits\.max_connections: .*int"]),
    # the limits the defence's tables and caps are sized by (they trust these checks)
    ("prefix-low", "[ratelimit]\nipv6_prefix = -1\n", [r"ratelimit\.ipv6_prefix: .*>= 0"]),
    ("prefix-high", "[ratelimit]\nipv6_prefix = 129\n", [r"ratelimit\.ipv6_prefix: .*<= 128"]),
    ("entries-zero", "[ratelimit]\nmax_entries = 0\n", [r"ratelimit\.max_entries: .*>= 1"]),
    ("caps-zero", "[limits]\nmax_connections = 0\n", [r"limits\.max_connections: .*>= 1"]),
    (
        "caps-negative",
        "[limits]\nmax_connections_per_source = -1\nmax_callback_queue = -1\n",
        [r"limits\.max_connections_per_source: .*>= 1", r"limits\.max_callback_queue: .*>= 0"],
    ),
    ("type-bool", '[server]\nudp = "yes"\n', [r"server\.udp: .*bool"]),
    ("type-array", '[server]\nlisten = "0.0.0.0:9000"\n', [r"server\.listen: .*array"]),
    ("type-table", "server = 3\n", [r"server: expected a \[server\] table"]),
    ("unknown-key", "[policy]\nbogus = 1\n", [r"policy\.bogus: unknown key"]),
    ("unknown-section", "[nope]\nx = 1\n", [r"nope: unknown section"]),
    ("top-level-key", "grace_period = '5s'\n", [r"grace_period: unknown section"]),
    (
        "cidr-host-bits",
        '[policy]\nallow_networks = ["10.0.0.1/8"]\n',
        [r"policy\.allow_networks\[0\]: expected a CIDR .*host bits"],
    ),
    (
        "cidr-garbage",
        '[policy]\ndeny_networks = ["10.0.0.0/8", "lan"]\n',
        [r"policy\.deny_networks\[1\]: expected a CIDR"],
    ),
    (
        "cidr-not-string",
        "[policy]\nreport_only_deny_networks = [10]\n",
        [r"policy\.report_only_deny_networks\[0\]: expected a CIDR"],
    ),
    # the SPEC's own example, to the letter
    (
        "rate-word",
        '[ratelimit]\nper_source = "ten"\n',
        [r'ratelimit\.per_source: expected "N/unit", got "ten"$'],
    ),
    (
        "rate-unit",
        '[ratelimit]\nper_target = "10/fortnight"\n',
        [r'ratelimit\.per_target: expected "N/unit", got "10/fortnight"'],
    ),
    ("rate-number", "[ratelimit]\nglobal = 5\n", [r'ratelimit\.global: expected "N/unit"']),
    (
        "rate-zero",
        '[ratelimit]\nper_source = "0/second"\n',
        [r"ratelimit\.per_source: expected N >= 1"],
    ),
    (
        "duration-word",
        '[server]\ngrace_period = "soon"\n',
        [r'server\.grace_period: expected a duration like "250ms"'],
    ),
    (
        "duration-unit",
        '[callback]\nconnect_timeout = "3 parsecs"\n',
        [r"callback\.connect_timeout: expected a duration"],
    ),
    (
        "duration-negative",
        "[protocol]\nread_deadline = -1\n",
        [r"protocol\.read_deadline: expected a non-negative duration"],
    ),
    (
        "duration-bool",
        "[tuning]\nquiet_period = true\n",
        [r"tuning\.quiet_period: expected a duration"],
    ),
    (
        "duration-zero",
        '[callback]\nconnect_timeout = "0s"\n',
        [r"callback\.connect_timeout: expected a duration > 0"],
    ),
    (
        "ports-reversed",
        '[policy]\nports = ["20000-10000"]\n',
        [r"policy\.ports\[0\]: expected ports within 1-65535 with low <= high"],
    ),
    (
        "ports-too-high",
        "[policy]\nports = [70000]\n",
        [r"policy\.ports\[0\]: expected ports within"],
    ),
    ("ports-zero", '[policy]\nports = ["0-100"]\n', [r"policy\.ports\[0\]: expected ports within"]),
    ("ports-word", '[policy]\nports = ["web"]\n', [r"policy\.ports\[0\]: expected a port range"]),
    ("ports-empty", "[policy]\nports = []\n", [r"policy\.ports: expected at least one"]),
    (
        "listen-hostname",
        '[server]\nlisten = ["localhost:9000"]\n',
        [r"server\.listen\[0\]: expected an IP address"],
    ),
    (
        "listen-no-port",
        '[server]\nlisten = ["0.0.0.0:9000", "1.2.3.4"]\n',
        [r"server\.listen\[1\]: expected HOST:PORT"],
    ),
    (
        "listen-port-range",
        '[server]\nlisten = ["[::1]:99999"]\n',
        [r"server\.listen\[0\]: expected HOST:PORT"],
    ),
    ("listen-empty", "[server]\nlisten = []\n", [r"server\.listen: expected at least one"]),
    ("admin-word", '[server]\nadmin = "nope"\n', [r'server\.admin: .*\(or "off"\)']),
    ("mode", '[policy]\nmode = "lenient"\n', [r'policy\.mode: expected one of "strict"']),
    ("auth-no-secret", '[auth]\nmode = "token"\n', [r"auth\.secret: .*needs auth\.secret"]),
    (
        "several",
        '[ratelimit]\nper_source = "ten"\nglobal = 5\n[policy]\nbogus = 1\n[nope]\n',
        [
            r"ratelimit\.per_source: ",
            r"ratelimit\.global: ",
            r"policy\.bogus: unknown key",
            r"nope: unknown section",
        ],
    ),
    (
        "several-semantic",
        '[server]\nlisten = ["x:1"]\nadmin = "y"\nbacklog = 0\n',
        [r"server\.listen\[0\]: ", r"server\.admin: ", r"server\.backlog: "],
    ),
]


def _assert_problems(lines: list[str], expected: list[str]) -> None:
    assert len(lines) == len(expected), lines
    for pattern in expected:
        assert any(re.match(pattern, line) for line in lines), (pattern, lines)


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_loads_names_the_key(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.loads(text)
    _assert_problems(caught.value.problems, expected)


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_config_exits_2_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out = check_config_here(path, capsys)
    assert code == 2, out
    _assert_problems(out.splitlines(), expected)


@pytest.mark.slow
def test_the_real_check_config_exits_2_one_line_per_problem(tmp_path: Path) -> None:
    [(text, expected)] = [b[1:] for b in BAD if b[0] == "several-semantic"]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = check_config(path)
    assert result.returncode == 2, result.stdout + result.stderr
    _assert_problems(result.stdout.splitlines(), expected)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, r".*missing\.toml: cannot read"), (b"\xff\xfe[server]\n", r".*: not UTF-8 text")],
    ids=["missing", "not-utf8"],
)
def test_check_config_unreadable_file(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "missing.toml"
    if content is not None:
        path.write_bytes(content)
    result = check_config(path)
    assert result.returncode == 2
    _assert_problems(result.stdout.splitlines(), [expected])


def test_type_and_semantic_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.loads('[server]\nlisten = ["localhost:9000"]\ngrace_period = "soon"\n')
    _assert_problems(caught.value.problems, [r"server\.grace_period: ", r"server\.listen\[0\]: "])


def test_every_bad_item_of_a_list_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.loads('[policy]\nallow_networks = ["10.0.0.0/8", "nope", "10.0.0.1/8"]\n')
    _assert_problems(
        caught.value.problems,
        [r"policy\.allow_networks\[1\]: ", r"policy\.allow_networks\[2\]: "],
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[protocol]\nwrite_timeout = "0s"\n', r"protocol\.write_timeout: "),
        ("[tuning]\nquiet_period = 0\n", r"tuning\.quiet_period: "),
        (
            '[protocol]\nread_deadline = "5s"\n[tuning]\nquiet_period = "6s"\n',
            r"tuning\.quiet_period: ",
        ),
        # refusals held longer than max_refusal_delay, or than a minute
        ('[tuning]\nrefusal_delay = "6s"\n', r"tuning\.max_refusal_delay: "),
        ('[tuning]\nmax_refusal_delay = "2m"\n', r"tuning\.max_refusal_delay: "),
        ("[tuning]\nmax_refusals_held = -1\n", r"tuning\.max_refusals_held: "),
        ('[tuning]\nrefusal_delay = "-1s"\n', r"tuning\.refusal_delay: "),
        # bans: never negative, a ban between 0 and a day, a list of 1-100000
        ("[tuning]\nban_after = -1\n", r"tuning\.ban_after: "),
        ("[tuning]\nban_after_ignored = -1\n", r"tuning\.ban_after_ignored: "),
        ("[tuning]\nban_spread = 1.5\n", r"tuning\.ban_spread: "),
        ("[tuning]\nban_spread = -0.1\n", r"tuning\.ban_spread: "),
        ('[tuning]\nban_duration = "0s"\n', r"tuning\.ban_duration: "),
        ('[tuning]\nban_duration = "2d"\n', r"tuning\.ban_duration: "),
        ('[tuning]\nban_after = "ten"\n', r"tuning\.ban_after: "),
        ("[tuning]\nmax_bans = 0\n", r"tuning\.max_bans: "),
        ("[tuning]\nerror_fine = -1\n", r"tuning\.error_fine: "),
        ('[tuning]\nerrors_global = "0/second"\n', r"tuning\.errors_global: "),
        ('[limits]\nban_exempt_networks = ["203.0.113.0/33"]\n', r"limits\.ban_exempt_networks"),
        ("[tuning]\nmax_bans = 100001\n", r"tuning\.max_bans: "),
        # the silent drop: a count >= 0, a duration between 0 and a day
        ("[tuning]\nsilent_drop_after = -1\n", r"tuning\.silent_drop_after: "),
        ('[tuning]\nsilent_drop_duration = "0s"\n', r"tuning\.silent_drop_duration: "),
        ('[tuning]\nsilent_drop_duration = "25h"\n', r"tuning\.silent_drop_duration: "),
        # TCP_DEFER_ACCEPT: the kernel's schedule ends at 127 s; never negative
        ('[tuning]\ndefer_accept = "121s"\n', r"tuning\.defer_accept: "),
        ('[tuning]\ndefer_accept = "-1s"\n', r"tuning\.defer_accept: "),
        ("[tuning]\ndefer_accept = true\n", r"tuning\.defer_accept: "),
    ],
)
def test_durations_out_of_range_are_refused(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.loads(text)
    _assert_problems(caught.value.problems, [key])


def test_bans_are_the_profiles_and_tuning_overrides_them() -> None:
    assert config_mod.loads('[limits]\nprofile = "classroom"\n').limits.ban_after == 0
    default = config_mod.loads("").limits
    assert default.profile == "internet"
    assert (default.ban_after, default.ban_duration, default.max_bans) == (10, 300.0, 10000)
    assert default.ban_after_ignored == 1 and default.ban_spread == 0.5
    assert config_mod.loads("[tuning]\nban_spread = 0\n").limits.ban_spread == 0.0
    assert config_mod.loads("[tuning]\nban_after_ignored = 0\n").limits.ban_after_ignored == 0
    tuned = config_mod.loads('[limits]\nprofile = "classroom"\n[tuning]\nban_after = 3\n')
    assert (tuned.limits.ban_after, tuned.ratelimit.error_fine) == (3, 0)  # the rest: classroom


def test_the_silent_drop_defaults_on_and_can_be_turned_off(tmp_path: Path) -> None:
    default = config_mod.loads("").limits
    assert (default.silent_drop_after, default.silent_drop_duration) == (50, 60.0)
    path = tmp_path / "off.toml"
    path.write_text("[tuning]\nsilent_drop_after = 0\n")
    assert config_mod.load(str(path)).limits.silent_drop_after == 0
    result = check_config(path)
    assert result.returncode == 0 and "  silent      never dropped\n" in result.stdout, result


def test_defer_accept_defaults_on_and_can_be_turned_off() -> None:
    assert config_mod.loads("").server.defer_accept == 30.0
    assert config_mod.loads("[tuning]\ndefer_accept = 0\n").server.defer_accept == 0.0
    assert config_mod.loads('[tuning]\ndefer_accept = "2m"\n').server.defer_accept == 120.0


def test_refusals_can_be_answered_at_once() -> None:
    cfg = config_mod.loads("[tuning]\nrefusal_delay = 0\nmax_refusal_delay = 0\n")
    assert (cfg.limits.refusal_delay, cfg.limits.max_refusal_delay) == (0.0, 0.0)


# --- limits.profile: the defence constants ---------------------------------------


def test_at_most_40_keys() -> None:
    assert len(KEYS) <= 40, _ids(KEYS)
    assert ("limits", "profile", "profile") in KEYS


def _constants(cfg: Config) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in config_mod.CONSTANTS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        out[key] = (value.count, value.period) if isinstance(value, Rate) else value
    return out


# The effective values of the shipped profiles before the constants became a
# profile (every key of the old config, loaded from each file): they must not move.
BOTH = {
    "server.defer_accept": 30.0,
    "protocol.quiet_period": 0.25,
    "policy.resolve_timeout": 2.0,
    "ratelimit.errors_global": (200, 1.0),
    "limits.refusal_delay": 0.5,
    "limits.max_refusal_delay": 5.0,
    "limits.max_refusals_held": 8192,
    "limits.ban_after_ignored": 1,
    "limits.ban_spread": 0.5,
    "limits.max_bans": 10000,
    "limits.silent_drop_after": 50,
    "limits.silent_drop_duration": 60.0,
    "udp.cookie_window": 30.0,
    "udp.max_datagram_bytes": 512,
    "udp.unproven_global": (500, 1.0),
}
WAS = {
    "lab.toml": {
        **BOTH,
        "callback.max_response_bytes": 4096,
        "ratelimit.error_fine": 0,
        "limits.ban_after": 0,
        "limits.ban_duration": 60.0,
        "udp.unproven_per_source": (1200, 60.0),
    },
    "internet.toml": {
        **BOTH,
        "callback.max_response_bytes": 1024,
        "ratelimit.error_fine": 30,
        "limits.ban_after": 10,
        "limits.ban_duration": 300.0,
        "udp.unproven_per_source": (10, 60.0),
    },
}


@pytest.mark.parametrize(
    ("name", "profile"), [("lab.toml", "classroom"), ("internet.toml", "internet")]
)
def test_shipped_profiles_keep_their_effective_values(name: str, profile: str) -> None:
    cfg = config_mod.load(str(CONFIG_DIR / name))
    assert cfg.limits.profile == profile
    assert _constants(cfg) == WAS[name]
    # and the profile alone gives them, whatever else the file sets
    assert _constants(config_mod.loads(f'[limits]\nprofile = "{profile}"\n')) == WAS[name]
    assert (cfg.ratelimit.ipv6_prefix, cfg.ratelimit.max_entries, cfg.server.backlog) == (
        (64, 100_000, 4096) if profile == "classroom" else (56, 50_000, 1024)
    )


def test_the_default_profile_is_internet_and_the_struct_defaults_are_its_constants() -> None:
    assert _constants(Config()) == _constants(config_mod.loads('[limits]\nprofile = "internet"\n'))
    assert Config().limits.profile == "internet"


# (removed key, a value, what the error must say besides the key)
REMOVED = [
    ("limits.ban_after", "5", r'set limits\.profile = "internet" \(10\) or "classroom" \(0\)'),
    ("limits.ban_duration", '"1m"', r'"internet" \("5m"\) or "classroom" \("60s"\)'),
    ("ratelimit.error_fine", "0", r'"internet" \(30\) or "classroom" \(0\)'),
    (
        "udp.unproven_per_source",
        '"5/minute"',
        r'"internet" \("10/minute"\) or "classroom" \("1200/minute"\)',
    ),
    ("server.defer_accept", '"1s"', r'a constant now, "30s" in every limits\.profile'),
    ("protocol.quiet_period", '"1s"', r'a constant now, "250ms" in every limits\.profile'),
    ("limits.silent_drop_after", "0", r"a constant now, 50 in every limits\.profile"),
    ("udp.cookie_window", '"1s"', r'a constant now, "30s" in every limits\.profile'),
]


@pytest.mark.parametrize(("key", "value", "says"), REMOVED, ids=[r[0] for r in REMOVED])
def test_a_removed_key_names_its_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, says: str
) -> None:
    section, name = key.split(".")
    text = f"[{section}]\n{name} = {value}\n"
    with pytest.raises(ConfigError) as caught:
        config_mod.loads(text)
    _assert_problems(caught.value.problems, [rf"{re.escape(key)}: removed: .*{says}"])
    path = tmp_path / "old.toml"
    path.write_text(text)
    code, out = check_config_here(path, capsys)
    assert code == 2
    _assert_problems(out.splitlines(), [rf"{re.escape(key)}: removed: .*{says}"])


def test_every_constant_is_a_removed_key_and_tunable() -> None:
    for key, (_, internet) in config_mod.CONSTANTS.items():
        section, name = key.split(".")
        value = f'"{internet}"' if isinstance(internet, str) else internet
        with pytest.raises(ConfigError) as caught:
            config_mod.loads(f"[{section}]\n{name} = {value}\n")
        _assert_problems(caught.value.problems, [rf"{re.escape(key)}: removed: "])
        tuned = config_mod.loads(f"[tuning]\n{name} = {value}\n")
        assert getattr(getattr(tuned, section), name) == getattr(getattr(Config(), section), name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[tuning]\nper_source = 5\n", [r"tuning\.per_source: unknown key"]),
        ("tuning = 3\n", [r"tuning: expected a \[tuning\] table"]),
        (
            '[limits]\nprofile = "lan"\n',
            [r'limits\.profile: expected one of "classroom", "internet"'],
        ),
        (
            "[limits]\nban_after = 0\nmax_bans = 5\n",
            [r"limits\.ban_after: removed: ", r"limits\.max_bans: removed: "],
        ),
    ],
)
def test_profile_and_tuning_mistakes_name_the_key(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.loads(text)
    _assert_problems(caught.value.problems, expected)
