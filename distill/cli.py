"""The `distill` command: wires each stage's `add_parser` into one CLI.

Expected problems (bad input files, a model that is not there) print one line
on stderr and exit with status 2; an LLM server refusing a request prints its
message and exits with status 1; no traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from labelers.backends import BackendError

from . import evaluate
from .data import DataError
from . import cache, pipeline
from .stages import generate, label, mine
from .training import pretrain
from .training import run as train
from .training.step import NonFiniteLoss

# Each sub-command module offers add_parser(subparsers); add new stages here.
COMMANDS = [generate, mine, label, pretrain, train, evaluate, pipeline, cache]
EXIT_BAD_INPUT = 2
EXIT_BACKEND_REFUSED = 1
EXIT_FAILED = 1  # the job itself went wrong (a diverging loss): the message says what is kept
EXIT_INTERRUPTED = 130


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="LLM-taught retrieval: label, mine, train, evaluate.")
    parser.add_argument("--log-level", default=os.environ.get("DISTILL_LOG_LEVEL", "WARNING"),
                        help="logging level for library messages (default: WARNING)")
    parser.add_argument("--config", help="YAML file with settings; flags override it")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BackendError as exc:
        # The LLM server refused the work (a 4xx other than 429): its message, no retry, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BACKEND_REFUSED
    except (ValueError, OSError) as exc:
        # Settings that fail validation, models or files that are not there.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: what was written is kept (finished chunks are fsync'd); rerun the same command to "
              "resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_and_exit(argv: list[str] | None = None) -> None:
    """The `distill` command: `main`, then exit with its status.

    After Ctrl-C, or after an in-process vLLM engine ran, the process ends with `os._exit`
    once stdout/stderr are flushed (every output file is already fsync'd by
    then): vLLM's threads can otherwise abort the interpreter's teardown
    ("terminate called without an active exception", SIGABRT) after a job
    that succeeded."""
    code = main(argv)
    vllm_backend = sys.modules.get("labelers.backends.vllm")
    # after Ctrl-C, worker threads (an openai request in flight, a vLLM engine) must not hold the exit: every
    # output is fsync'd chunk by chunk, so nothing is lost by leaving without joining them
    if code == EXIT_INTERRUPTED or (vllm_backend is not None and getattr(vllm_backend, "ENGINES_STARTED", 0)):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_and_exit()
