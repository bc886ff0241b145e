"""The command line: ``python scripts/ndif_local.py install|start|deploy|status|stop|env|watch ...``."""

from __future__ import annotations

import argparse
import sys

from . import __doc__ as PACKAGE_DOC
from .common import HarnessError, on_ci
from .deploy import cmd_deploy
from .install import cmd_install
from .stack import PORT_NAMES, cmd_env, cmd_start, cmd_status, cmd_stop, cmd_watch


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ndif_local.py", description=PACKAGE_DOC.split("\n\n")[0],
                                  epilog="See scripts/ndif_local/__init__.py for the details.")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install redis-server and the cached server venvs (idempotent)")
    p.add_argument("--or-skip", action="store_true",
                   help="when it cannot install, say why and exit 0, unless on CI (CI=true): for `make test`, "
                        "whose NDIF server tests then skip (and fail on CI)")

    def with_dir(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dir", required=True, help="the stack's folder (RUNDIR); every file stays in it")
        return p

    p = with_dir("start", "start the stack in RUNDIR and wait until its API answers")
    for name in PORT_NAMES:
        p.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=None, dest=f"{name}_port",
                       help=argparse.SUPPRESS if name not in ("api", "redis", "s3", "ray", "ray_client") else
                       f"the {name.replace('_', ' ')} port (default: a free one)")
    p.add_argument("--port-base", type=int, default=None,
                   help="take the ports not given from PORT_BASE upwards (default: a random free range)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the API (default 180)")
    p = with_dir("deploy", "serve local model folders and wait until they are ready")
    p.add_argument("folders", nargs="+", metavar="MODEL_FOLDER")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait per model (default 300)")
    with_dir("stop", "stop every process of the stack (idempotent)")
    p = with_dir("status", "what runs (exit 0 when the API answers, 3 otherwise)")
    p.add_argument("-v", "--verbose", action="store_true", help="list the processes")
    p.add_argument("--json", action="store_true", help="also print a JSON summary")
    with_dir("env", "print the stack's environment as shell exports")
    p = with_dir("watch", "wait until process PID ends, then stop the stack (a guard for test sessions)")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--interval", type=float, default=2.0)
    return top


COMMANDS = {"install": cmd_install, "start": cmd_start, "deploy": cmd_deploy, "stop": cmd_stop,
            "status": cmd_status, "env": cmd_env, "watch": cmd_watch}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except HarnessError as error:
        if args.command == "install" and args.or_skip and not on_ci():
            print(f"ndif_local: cannot install the NDIF server ({error}): its tests will be skipped")
            return 0
        print(f"ndif_local: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
