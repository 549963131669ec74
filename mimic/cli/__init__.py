"""The ``mimic`` command line: core subcommands here, the pipeline fronts register theirs.

Exit codes (scripts can rely on them):

====  =====================================================================================
0     success; for ``audit``/``demo``: the student passed the gate (sanitized)
1     failure that is not the input's fault (a service down after retries, a failed watch tick)
2     bad input: unusable model file, data, parameters; the message says which (one line)
3     rejected: the gate rejected the student (or ``scan`` found the encoder suspicious)
130   interrupted; run the same command again to resume from the last checkpoint
====  =====================================================================================

Commands that produce results write them with ``--json PATH`` (``--json -``: to stdout, with the
human-readable output moved to stderr). Orchestration fronts (``audit``, ``watch``) are found via
the ``mimic.commands`` entry point group, so this package never imports Prefect, MLflow or DVC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from mimic.errors import ConfigError, MimicError, ServiceUnavailable

log = logging.getLogger("mimic")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

Command = Callable[[argparse.Namespace], dict]
COMMANDS: dict[str, Command] = {}


def common(p: argparse.ArgumentParser) -> None:
    """Options every command takes: parameters, threads, output and logging."""
    g = p.add_argument_group("parameters")
    g.add_argument("--params", metavar="FILE", help="params.yaml to read (default: the package defaults)")
    g.add_argument("--profile", metavar="NAME", help="a named profile (tiny, demo-data, gpu, ...)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one parameter (repeatable)")
    g.add_argument("--device", help="auto | cpu | cuda[:N] (overrides the 'device' param)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: one per core); "
                   "CPU results are bit-identical only at the same thread count")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': stdout)")
    o.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only, no progress bars "
                   "(the result lines still print)")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging (the resolved config, ...); log lines carry a timestamp")
    o.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON objects")
    o.add_argument("--debug", action="store_true", help="show tracebacks")


def add_command(sub: Any, name: str, fn: Command, **kw: Any) -> argparse.ArgumentParser:
    """Register a subcommand (used by the core and by fronts' ``mimic.commands`` entry points)."""
    COMMANDS[name] = fn
    return sub.add_parser(name, **kw)


def build_parser() -> argparse.ArgumentParser:
    from mimic import __version__
    from mimic.cli import commands

    parser = argparse.ArgumentParser(prog="mimic", description="Audit self-supervised image encoders for backdoors "
                                     "and sanitize them with MIMIC.")
    parser.add_argument("--version", action="version", version=f"mimic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    for ep in entry_points(group="mimic.commands"):
        try:
            register = ep.load()
        except ImportError as exc:  # that front's dependencies are not installed: its commands are absent
            log.debug("mimic.commands entry point %s not loaded: %s", ep.name, exc)
            continue
        register(sub)
    return parser


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


_handler: logging.Handler | None = None


def setup_logging(args: argparse.Namespace) -> None:
    """One stderr handler (text with timestamps, or JSON lines); ``mimic`` at INFO, DEBUG with -v, WARNING with -q."""
    global _handler
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.WARNING)  # libraries: warnings and errors
    logging.getLogger("mimic").setLevel(level)


def out_stream(args: argparse.Namespace):
    """Where human-readable output goes: stdout, or stderr when ``--json -`` takes stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def say(args: argparse.Namespace, text: str) -> None:
    print(text, file=out_stream(args), flush=True)


def emit(args: argparse.Namespace, result: dict, stdout=None) -> None:
    if not args.json:
        return
    from mimic.io import json_bytes, write_json

    if args.json == "-":
        out = stdout or sys.stdout
        out.write(json_bytes(result).decode())
        out.flush()
    else:
        write_json(args.json, result)


def exit_code(result: dict) -> int:
    """3 when a verdict rejected the student (or a scan found the encoder suspicious); 1 when a
    watch tick had failures; else 0."""
    if result.get("failed"):
        return EXIT_FAILED
    verdict = result.get("verdict")
    if isinstance(verdict, dict) and verdict.get("passed") is False:
        return EXIT_REJECTED
    if any(a.get("verdict") == "rejected" for a in result.get("audited", []) if isinstance(a, dict)):
        return EXIT_REJECTED
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    t0 = time.perf_counter()
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        if hasattr(args, "threads"):
            from mimic.runtime import set_threads

            set_threads(args.threads)  # default: the physical cores this process may use
        stdout = sys.stdout
        if getattr(args, "json", None) == "-":  # the results alone on stdout: whatever a library prints goes to stderr
            with contextlib.redirect_stdout(sys.stderr):
                result = COMMANDS[args.command](args)
        else:
            result = COMMANDS[args.command](args)
        result.setdefault("seconds", round(time.perf_counter() - t0, 2))
        if getattr(args, "config", None) is not None and "environment" not in result:
            from mimic.results import environment

            result["environment"] = environment(args.config.device, args.config.seed)
        emit(args, result, stdout)
        code = exit_code(result)
        return 0 if code == EXIT_REJECTED and getattr(args, "exit_zero", False) else code
    except ServiceUnavailable as exc:
        if args.debug:
            raise
        print(f"mimic: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except MimicError as exc:
        if args.debug:
            raise
        print(f"mimic: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("mimic: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.debug:
            raise
        print(f"mimic: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
