"""The `distill` command: wires each stage's `add_parser` into one CLI.

Expected problems print one line on stderr, no traceback: bad input files and
settings (`UsageError`, `DataError`) and files or models that are not there or
cannot be written exit with status 2; an LLM server refusing a request, or a
job that went wrong (a diverging loss), exit with status 1; a teacher that does
not beat the retriever (`distill check-teacher`, and `distill run` before it
labels) exits with status 3. Anything else is a
bug, ours or a library's: it keeps its traceback (exit 1), so it can be
reported.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from labelers.backends import BackendError
from labelers.errors import UsageError

from . import evaluate
from . import cache, pipeline
from .stages import check_teacher, generate, label, mine
from .training import pretrain
from .training import command as train
from .training.step import NonFiniteLoss

# Each sub-command module offers add_parser(subparsers); add new stages here.
COMMANDS = [generate, mine, check_teacher, label, pretrain, train, evaluate, pipeline, cache]
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
    except UsageError as exc:  # our own checks (DataError among them): the message says what to fix
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except check_teacher.WeakTeacher as exc:  # the teacher would not pay its labelling: stop before it runs
        print(f"error: {exc}", file=sys.stderr)
        return check_teacher.EXIT_WEAK_TEACHER
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BackendError as exc:
        # The LLM server refused the work (a 4xx other than 429): its message, no retry, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BACKEND_REFUSED
    except OSError as exc:
        if not _environment_problem(exc):
            raise
        # a file or model that is not there, a folder that cannot be written, a full disk
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: what was written is kept (finished chunks are fsync'd); rerun the same command to "
              "resume", file=sys.stderr)
        return EXIT_INTERRUPTED


# OSErrors that are the machine's or the user's paths, not a bug: anything else keeps its traceback
ENVIRONMENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC, errno.EROFS,
                      errno.EEXIST, errno.ENOTEMPTY, errno.EDQUOT}
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _environment_problem(exc: OSError) -> bool:
    """A missing or unwritable path, a full disk; or a model loader's OSError ("... does not appear to have a
    file named config.json"), which carries no errno."""
    return (exc.errno in ENVIRONMENT_ERRNOS or isinstance(exc, PATH_ERRORS)
            or (exc.errno is None and type(exc) is OSError))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
