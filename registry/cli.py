"""``registry`` command line: serve | check-config | results | token. The only trio.run()."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

import trio

from registry import config as config_mod
from registry import log as log_mod
from registry.admin import results
from registry.admin.results import student_name as token_name
from registry.config import Config
from registry.errors import ConfigError

# sysexits EX_CONFIG: a bad config is not transient, and the systemd unit lists
# it in RestartPreventExitStatus= so a service manager does not restart-loop.
EXIT_CONFIG = 78
EXIT_USAGE = 64


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="registry", description="The Callback Connection lab's Registry Server.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the registry daemon")
    serve.add_argument(
        "--config", metavar="FILE", help="TOML config file (default: embedded defaults)"
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="registration address, repeatable (default 0.0.0.0:9000 and [::]:9000)",
    )
    serve.add_argument(
        "--admin", metavar="HOST:PORT|off", help="admin HTTP (default 127.0.0.1:9100)"
    )
    serve.add_argument("--db", metavar="PATH", help="SQLite results file (default registry.db)")
    serve.add_argument("--workers", metavar="N", type=int, help="processes; 0: one per core")
    serve.add_argument(
        "--log-format", choices=log_mod.FORMATS, help="default: console on a TTY, else json"
    )
    serve.add_argument("--log-level", choices=log_mod.LEVELS)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE")

    res = sub.add_parser("results", help="list recorded registrations")
    results.add_arguments(res)

    token = sub.add_parser("token", help='print a student\'s token (auth.mode = "token")')
    token.add_argument("student", metavar="NAME", type=token_name)
    token.add_argument(
        "--config", metavar="FILE", help="config holding auth.secret or auth.secret_file"
    )
    return parser


def version_line() -> str:
    """``callback-lab X.Y.Z``, from the installed distribution's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"callback-lab {version('callback-lab')}"
    except PackageNotFoundError:
        return "callback-lab (not installed: run it through run.py or pip install .)"


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The config file (or defaults) with the command line's options over its keys."""
    server = {"listen": args.listen, "admin": args.admin, "db": args.db, "workers": args.workers}
    log = {"format": args.log_format, "level": args.log_level}
    overrides = {
        "server": {k: v for k, v in server.items() if v is not None},
        "log": {k: v for k, v in log.items() if v is not None},
    }
    return config_mod.load(args.config or None, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from registry import group as workers
    from registry.server import Registry
    from registry.store import StoreError

    try:
        cfg = load_config(args)
        config_mod.auth_secret(cfg)  # an unreadable auth.secret_file is a config error too
    except ConfigError as e:
        return _config_problems(e)
    seat = workers.worker_seat()
    n = seat.count if seat is not None else workers.resolved_workers(cfg)
    if n > 1:  # several processes write to one stderr
        workers.whole_lines()
    log_mod.describe_config(args.config)
    log_mod.configure(cfg.log.format, cfg.log.level)
    _raise_fd_limit()
    _calm_the_garbage_collector()
    status = 0
    try:  # a bad [class] roster is a ConfigError from the registry's (or group's) start
        if seat is not None:  # one of a group's workers, on the sockets its supervisor opened
            run = Registry(
                workers.split_limits(cfg, n),
                config_path=args.config,
                loader=lambda: workers.split_limits(load_config(args), n),
                seat=seat,
            ).run
        elif n > 1:  # args.argv: the workers' command line
            run = workers.Supervisor(
                cfg, n, args.argv, config_path=args.config, loader=lambda: load_config(args)
            ).run
        else:
            run = Registry(cfg, config_path=args.config, loader=lambda: load_config(args)).run
        trio.run(run)
    # except*: errors from inside nurseries arrive wrapped in exception groups.
    except* ConfigError as group:
        status = _config_problems(_first(group))  # type: ignore[arg-type]
    except* StoreError as group:
        print(f"registry: results database: {_first(group)}", file=sys.stderr)
        status = EXIT_CONFIG
    except* OSError as group:
        err = _first(group)
        print(f"registry: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
        status = 1
    except* KeyboardInterrupt:  # a second Ctrl-C during the drain
        status = 130
    except* workers.GroupFailed as failed:  # a worker could not start: its status
        status = failed.exceptions[0].status  # type: ignore[attr-defined]
    return status


def _config_problems(e: ConfigError, status: int = EXIT_CONFIG) -> int:
    for problem in e.problems:
        print(f"registry: config: {problem}", file=sys.stderr)
    return status


def _calm_the_garbage_collector() -> None:
    """Keep full collections short: they stop every connection at once. Everything alive
    now lives as long as the process; frozen, it is out of the collector's sight
    (40-100 ms full collections became a few ms: docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()


def _raise_fd_limit() -> None:
    """Use the hard RLIMIT_NOFILE: each open registration costs a descriptor (docs/limits.md)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _first(group: BaseExceptionGroup) -> BaseException:
    err: BaseException = group
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err


def cmd_check_config(args: argparse.Namespace) -> int:
    from registry.admin.core.grading import load_roster

    try:
        cfg = config_mod.load(args.file)
        roster = load_roster(cfg)
    except ConfigError as e:
        for problem in e.problems:
            print(problem)
        return 2
    print(config_summary(cfg))
    if roster is not None:
        print(f"  class       {len(roster)} students in {roster.path}")
    return 0


def config_summary(cfg: Config) -> str:
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
        f"  profile     {lim.profile} (docs/limits.md)",
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


def cmd_token(args: argparse.Namespace) -> int:
    from registry.policy import auth

    try:
        cfg = config_mod.load(args.config or None)
        secret = config_mod.auth_secret(cfg)
    except ConfigError as e:
        return _config_problems(e, 2)
    if not secret:
        where = (
            f"{args.config} sets neither auth.secret nor auth.secret_file"
            if args.config
            else "no --config FILE was given"
        )
        print(
            f"registry: tokens need a secret, and {where}.\n"
            "Create one, readable only by you:\n"
            "  (umask 077; head -c 32 /dev/urandom | base64 > secret.key)\n"
            'then put in the config\n  [auth]\n  mode = "token"\n  secret_file = "secret.key"\n'
            "and run: registry token NAME --config FILE",
            file=sys.stderr,
        )
        return 2
    print(auth.derive_token(secret, args.student))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    commands = {
        "serve": cmd_serve,
        "check-config": cmd_check_config,
        "results": results.run,
        "token": cmd_token,
    }
    raise SystemExit(commands[args.command](args))


if __name__ == "__main__":
    main()
