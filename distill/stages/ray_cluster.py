"""Which Ray cluster a driver runs its actors on, and the private one it starts when there is none to join.

A driver joins the cluster it is told about: `--ray-address`, else `RAY_ADDRESS`, else the one `ray start` last
started on this machine (Ray's `ray_current_cluster` file in its temp dir, when that cluster still answers). We
never use Ray's `address="auto"`: its fallback joins any raylet running on the machine, so a second distill job
would join the cluster a first one started for itself, and die with it when that job ends.

With none to join, the driver starts a cluster of its own: `ray start --head --block` in a temp dir of its own (so
that its `ray_current_cluster` file is not the one other drivers read), under a supervisor process
(`python -m distill.stages.ray_cluster TEMP_DIR`) in a session of its own. The supervisor is the Linux child
subreaper of everything Ray starts below it (Ray's workers put themselves in process groups of their own, and its
dashboard and runtime-env agents outlive a killed raylet), and it reads a pipe whose write end only the driver
holds. When the driver ends in any way, kill -9 included, the pipe closes: the supervisor kills every process
below it, waits for them, and removes the temp dir. So a private cluster lives exactly as long as its driver,
whatever stage (or stages, in `distill run`) the driver runs on it.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labelers.errors import UsageError

INSTALL_HINT = "--executor ray needs Ray: pip install 'llm-distill-retrieval[ray]' (or pip install 'ray>=2.40')"
START_TIMEOUT_S = 180    # `ray start` on a busy machine takes seconds; a hung one must not hang the job
PR_SET_CHILD_SUBREAPER = 36


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return ray


def connect(address: str | None) -> None:
    """Join the cluster the module docstring names, or start this driver's private one; once per process."""
    ray = import_ray()
    if ray.is_initialized():  # a caller (a test, a library user, an earlier stage of `distill run`) connected
        return
    if address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        _check_answers(target, "--ray-address" if address else "RAY_ADDRESS")
    elif started_cluster() is not None:
        target = None  # Ray reads the same file, and turns token authentication on as for any cluster it finds
    else:
        cluster = PrivateCluster()
        target = cluster.address
        atexit.register(_shut_down, cluster)
        print(f"ray: no cluster to join (no --ray-address, RAY_ADDRESS or `ray start` on this machine): started one "
              f"for this job alone at {target}; it stops when the job ends", flush=True)
    ray.init(address=target, log_to_driver=False, logging_level="ERROR")


def _check_answers(address: str, source: str) -> None:
    """An address where nothing listens is one line at once, not minutes of Ray's retries and a traceback."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit() and not _listening(host, int(port)):  # not "auto" or another form Ray resolves
        raise UsageError(f"no Ray cluster answers at {address} (from {source}): start one there (`ray start "
                         "--head`), or give the address of one that runs")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=2):
            return True
    except OSError:
        return False


def started_cluster() -> str | None:
    """The address `ray start` wrote on this machine, when a cluster still answers there."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # Ray before 2.47
        from ray._private.utils import get_ray_address_file

    try:
        address = Path(get_ray_address_file(None)).read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    # a cluster killed without `ray stop` leaves the file behind: it is not one to join
    return address if port.isdigit() and _listening(host, int(port)) else None


def _shut_down(cluster: PrivateCluster) -> None:
    import ray

    ray.shutdown()
    cluster.stop()


class PrivateCluster:
    """A local Ray cluster for this driver alone; see the module docstring."""

    def __init__(self):
        _token_auth_as_for_a_local_cluster()
        self.temp_dir = tempfile.mkdtemp(prefix="distill-ray-")
        # the supervisor inherits stderr (its own bugs show); stdin and stdout are pipes to this driver only
        self.supervisor = subprocess.Popen([sys.executable, "-m", __name__, self.temp_dir], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, start_new_session=True, text=True)
        line = self.supervisor.stdout.readline().strip()
        kind, _, text = line.partition(" ")
        if kind != "address":
            self.stop()
            raise RuntimeError(f"could not start a local Ray cluster: {text or 'the supervisor ended'}")
        self.address = text

    def stop(self) -> None:
        """Close the pipe (the supervisor then stops everything below it) and wait until it has."""
        if self.supervisor.poll() is None:
            self.supervisor.stdin.close()
            self.supervisor.wait()


def _token_auth_as_for_a_local_cluster() -> None:
    """What `ray.init()` does for a cluster it starts: token authentication on (RAY_AUTH_MODE=token, unless the
    user set it), a token made when there is none. Set in this process, it is inherited by the supervisor's
    `ray start`, and this driver's `ray.init` with an explicit address uses it too (Ray turns it on by itself only
    for a cluster it finds). Ray's warning that it did so is kept quiet: the `ray:` line says what was started."""
    try:
        from ray._private.authentication import authentication_token_setup as auth
    except ImportError:  # a Ray from before token authentication
        return
    quiet, level = logging.getLogger(auth.__name__), logging.getLogger(auth.__name__).level
    quiet.setLevel(logging.ERROR)
    try:
        auth.enable_token_auth_by_default()
        auth.ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    finally:
        quiet.setLevel(level)


def supervise(temp_dir: Path) -> int:
    """The supervisor's work (see the module docstring); prints `address HOST:PORT` or `error WHY`, then waits for
    the driver to end."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # killed on purpose: still stop what is below
    _become_subreaper()
    log = temp_dir / "ray-start.log"
    try:
        with open(log, "wb") as out:
            ray_start = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                          "--port=0", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                                          "--disable-usage-stats"], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        address_file, deadline = temp_dir / "ray_current_cluster", time.monotonic() + START_TIMEOUT_S
        while not address_file.is_file() or not address_file.read_text().strip():
            if ray_start.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                print(f"error `ray start` {'ended' if ray_start.poll() is not None else 'hung'}: {tail[0]}",
                      flush=True)
                return 1
            time.sleep(0.1)
        print(f"address {address_file.read_text().strip()}", flush=True)
        sys.stdin.buffer.read()  # returns at EOF: the driver closed the pipe, or ended
        return 0
    finally:
        _kill_everything_below()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _become_subreaper() -> None:
    """Orphans of Ray's processes are re-parented to this process, not to init, so none escapes the cleanup."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _kill_everything_below(timeout_s: float = 30.0) -> None:
    """SIGKILL every descendant and reap it, until none is left (one may start another while we look)."""
    psutil = _psutil()
    me, deadline = psutil.Process(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = 0
        for process in me.children(recursive=True):
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
                    alive += 1
            except psutil.NoSuchProcess:  # gone between listing and killing
                pass
        _reap()
        if not alive:
            return
        time.sleep(0.05)
    print(f"distill: could not stop every Ray process below pid {os.getpid()}", file=sys.stderr)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _psutil():
    try:
        import psutil
    except ImportError:  # Ray ships its own copy, on sys.path once ray is imported
        import ray  # noqa: F401
        import psutil
    return psutil


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
