"""`fmstack` command line: the parser, built from one table of sub-commands (`fmstack/commands/`).
User errors print one line (`fmstack: error: ...`) and exit 2. Nothing in the library imports this module.

Terminal output: log records (and Python warnings, through logging) are written with `tqdm.write`,
so a line never lands glued onto a progress bar; deprecation and future warnings raised by
dependencies are hidden (a user cannot act on them; -v shows them, python -W decides alone), fmstack's
own are shown."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

import torch
from tqdm import tqdm

import fmstack
from fmstack.errors import FmstackError
from fmstack.parallel import dist

log = logging.getLogger("fmstack")

# sub-command -> module under fmstack.commands with HELP, configure(parser) and run(args) -> exit code
COMMANDS: dict[str, str] = {
    "generate": "fmstack.commands.generate",
    "eval": "fmstack.commands.eval",
    "bench": "fmstack.commands.bench",
    "quantize": "fmstack.commands.quantize",
    "serve": "fmstack.commands.serve",
    "finetune": "fmstack.commands.finetune",
    "doctor": "fmstack.commands.doctor",
    "compile": "fmstack.commands.compile",
    "cache": "fmstack.commands.cache",
}
DEPENDENCY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class TqdmHandler(logging.Handler):
    """Writes records to stderr through `tqdm.write`, which clears an active bar and redraws it below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: report and carry on
            self.handleError(record)


def hide_dependency_warnings(verbose: bool) -> None:
    """Deprecation/future warnings from dependencies hidden (shown with -v), fmstack's own shown;
    python -W / PYTHONWARNINGS, when given, decide alone."""
    if sys.warnoptions:
        return
    for category in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("default" if verbose else "ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"fmstack(\.|$)")


def setup_logging(level: int) -> None:
    """Records (and warnings, through logging) to stderr with tqdm.write, at `level`."""
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[TqdmHandler()])
    logging.captureWarnings(True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmstack", description="PyTorch-native LLaMA-family inference stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--version", action="version",
                        version=f"fmstack {fmstack.__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hide_dependency_warnings(verbose=bool({"-v", "--verbose"} & set(argv)))  # before the commands' imports
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    parallel = getattr(args, "parallel", "none") not in (None, "none")
    prog = "fmstack"
    if parallel:  # torchrun: rank 0 alone prints; the others log warnings and errors only
        prog, level = dist.rank_output_settings(prog, level)
        dist.silence_other_ranks()  # process-wide: sys.stdout -> /dev/null on ranks other than 0
        dist.report_launcher_stop(prog)  # process-wide: SIGTERM handler (undone in `finally` below)
    setup_logging(level)
    try:
        rc = args.run(args)
        if parallel:
            dist.shutdown()
        return rc
    except FmstackError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        msg = dist.failure_message(e) if parallel else None
        if msg is None:
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 3
    finally:
        if parallel:  # reported (or done): a SIGTERM from torchrun now just ends the process
            dist.restore_sigterm()
