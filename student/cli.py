"""The ``student`` command: ``server``, ``client``, ``lab`` and ``addresses``.

argparse in, an exit status out. Usage errors exit 64 (EX_USAGE), never
argparse's 2, which ``student client`` uses for DENIED. Each command is an
async function taking its options and an output callable, so tests call them
directly; ``main`` is the only place that calls ``trio.run``.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import sys
from collections.abc import Sequence
from typing import NoReturn

import trio

from student.addresses import run_addresses
from student.client import ClientOptions, run_client
from student.lab import run_lab
from student.server import ServerOptions, run_server
from student.wire import (
    EXIT_USAGE,
    check_name,
    check_value,
    parse_hostport,
    parse_port,
    unbracket,
)

EXIT_INTERRUPTED = 130


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit 64 instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _port(text: str, *, allow_zero: bool) -> int:
    try:
        return parse_port(text, allow_zero=allow_zero)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _any_port(text: str) -> int:
    return _port(text, allow_zero=True)


def _real_port(text: str) -> int:
    return _port(text, allow_zero=False)


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bind_address(text: str) -> str:
    host = unbracket(text.strip())
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address, got {text!r}") from None
    return host


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 10**9:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _word(label: str) -> functools.partial[str]:
    return functools.partial(_checked_word, label)


def _checked_word(label: str, text: str) -> str:
    try:
        return check_value(label, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name(text: str) -> str:
    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _advertise(text: str) -> str:
    return text if text == "auto" else _checked_word("--advertise", unbracket(text))


def _yes_no(text: str) -> bool:
    if text not in ("yes", "no"):
        raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")
    return text == "yes"


def _add_client_options(p: argparse.ArgumentParser, *, lab: bool) -> None:
    p.add_argument(
        "--registry",
        required=True,
        type=_hostport,
        metavar="HOST:PORT",
        help="the instructor's registry, e.g. 192.168.1.10:9000 or [2001:db8::1]:9000",
    )
    p.add_argument(
        "--port",
        type=_any_port if lab else _real_port,
        default=15000,
        metavar="N",
        help="the student server's port (default 15000)",
    )
    p.add_argument(
        "--advertise",
        type=_advertise,
        default="auto",
        metavar="IP|auto",
        help="the address to tell the registry (default auto: the address of the "
        "interface that routes to the registry)",
    )
    p.add_argument("--student", type=_name, metavar="NAME", help="your name")
    p.add_argument("--token", type=_word("--token"), metavar="T", help="your token, if required")
    p.add_argument(
        "--verify",
        type=_yes_no,
        metavar="yes|no",
        help="require (yes) or skip (no) the nonce echo; default: the registry's policy",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="speak the JSON-lines protocol")
    mode.add_argument("--udp", action="store_true", help="register over UDP (cookie challenge)")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=15.0,
        metavar="S",
        help="give up on the registry after S seconds (default 15)",
    )


def _version() -> str:
    """``callback-lab X.Y.Z``, the same line as ``registry --version``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"callback-lab {version('callback-lab')}"
    except PackageNotFoundError:
        return "callback-lab (not installed: pip install .)"


def build_parser() -> UsageParser:
    """The ``student`` argument parser (subparsers inherit the exit-64 behaviour)."""
    parser = UsageParser(prog="student", description="The student side of the Callback lab.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("server", help="listen for the registry's callback (lab part 1)")
    p.add_argument(
        "--port",
        type=_any_port,
        default=15000,
        metavar="N",
        help="port to listen on (default 15000)",
    )
    p.add_argument(
        "--bind",
        type=_bind_address,
        metavar="ADDR",
        help="one address to listen on (default: every interface, IPv4 and IPv6)",
    )
    p.add_argument(
        "--count",
        type=_positive_int,
        default=1,
        metavar="N",
        help="callbacks to accept before exiting (default 1)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="exit 1 if the callbacks have not arrived within S seconds",
    )
    p.add_argument("--udp", action="store_true", help="wait for a UDP callback datagram instead")

    p = sub.add_parser("client", help="register your server with the registry (lab part 2)")
    _add_client_options(p, lab=False)
    p = sub.add_parser("lab", help="run server and client together and show the timeline")
    _add_client_options(p, lab=True)
    p.add_argument(
        "--explain",
        action="store_true",
        help="afterwards, explain the lab's connections: every address pair, who chose "
        "each port, and why the registry could not have guessed your server's",
    )

    p = sub.add_parser("addresses", help="list this machine's addresses and what they mean")
    p.add_argument(
        "--registry",
        type=_hostport,
        metavar="HOST:PORT",
        help="also mark the address that routes to this registry",
    )
    return parser


def client_options(args: argparse.Namespace) -> ClientOptions:
    """``ClientOptions`` from parsed ``client``/``lab`` arguments."""
    return ClientOptions(
        registry=args.registry,
        port=args.port,
        advertise=args.advertise,
        student=args.student,
        token=args.token,
        verify=args.verify,
        json=args.json,
        udp=args.udp,
        timeout=args.timeout,
    )


def server_options(args: argparse.Namespace) -> ServerOptions:
    """``ServerOptions`` from parsed ``server`` arguments."""
    return ServerOptions(
        port=args.port, bind=args.bind, count=args.count, timeout=args.timeout, udp=args.udp
    )


def _out(line: str) -> None:
    print(line, flush=True)  # flushed: students pipe the output (| tee, | grep)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if " " in (getattr(args, "student", None) or "") and not args.json:
        parser.error("a --student name with spaces needs --json (in the text line a space ends it)")
    try:
        if args.command == "server":
            return trio.run(run_server, server_options(args), _out, _err)
        if args.command == "client":
            return trio.run(run_client, client_options(args), _out, _err)
        if args.command == "lab":
            run = functools.partial(run_lab, explain=args.explain)
            return trio.run(run, client_options(args), _out, _err)
        return run_addresses(args.registry, _out)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


def main() -> None:
    """Console-script entry point: ``student = "student.cli:main"``."""
    for stream in (sys.stdout, sys.stderr):
        # A peer's odd bytes or an em dash must never crash a non-UTF-8 terminal.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")
    sys.exit(run())
