"""`--executor ray` on real Ray clusters: the module's local one (2 CPUs, shared by most of these tests), and the
private ones `distill` drivers start for themselves when given none.

label, generate and mine give the bytes `--executor local` gives (both with one torch thread per process); a
worker killed with SIGKILL is restarted and the job still gives those bytes; a driver killed with SIGKILL leaves
a stale lock that does not block its rerun, which may use another `--workers`, redoes no complete part and redoes
a part changed after it was written; an exception raised in a worker reaches the user as itself; two jobs on one
machine neither share a cluster nor outlive their driver, and a second driver on one output is refused."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.cli import main

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed") if not os.environ.get("CI") else \
    __import__("ray")
psutil = pytest.importorskip("psutil")  # installed with Ray (which ships its own copy otherwise)
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a real Ray cluster, minutes a test; make test-fast leaves it out


@pytest.fixture(scope="module")
def cluster():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # local runs with the threads of a one-CPU actor: the same float sums
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    torch.set_num_threads(threads)


def label_args(llm: Path, data, out: Path, *extra: str) -> list[str]:
    return ["label", "--llm", str(llm), "--data", str(data), "--split", "test", "--output", str(out), "--device",
            "cpu", "--dtype", "float32", "--chunk-size", "2", "--no-show-progress", *extra]


def test_label_generate_and_mine_on_ray_equal_local(cluster, tiny_llama_dir, tiny_bert_dir, small_beir, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(label_args(tiny_llama_dir, small_beir, local)) == 0
    assert main(label_args(tiny_llama_dir, small_beir, remote, "--executor", "ray", "--workers", "2")) == 0
    assert remote.read_bytes() == local.read_bytes() and len(local.read_bytes().splitlines()) == 20
    assert not (tmp_path / "ray.jsonl.parts").exists()  # assembled, then removed
    assert not (tmp_path / "ray.jsonl.lock").exists()  # released
    for executor in ("local", "ray"):
        assert main(["generate", "--llm", str(tiny_llama_dir), "--data", str(small_beir), "--output",
                     str(tmp_path / f"gen-{executor}"), "--device", "cpu", "--dtype", "float32", "--chunk-size", "3",
                     "--max-passages", "12", "--max-new-tokens", "12", "--filters", "length", "copied", "duplicate",
                     "--executor", executor, "--no-show-progress"]) == 0
        assert main(["mine", "--model", str(tiny_bert_dir), "--data", str(small_beir), "--split", "test",
                     "--output", str(tmp_path / f"mine-{executor}.jsonl"), "--chunk-size", "3", "--cache-dir",
                     str(tmp_path / "cache"), "--executor", executor, "--no-show-progress"]) == 0
    for name in ("generations.jsonl", "queries.jsonl"):
        assert (tmp_path / "gen-ray" / name).read_bytes() == (tmp_path / "gen-local" / name).read_bytes()
    assert (tmp_path / "mine-ray.jsonl").read_bytes() == (tmp_path / "mine-local.jsonl").read_bytes()


def test_a_data_error_only_a_worker_meets_is_one_line_exit_2(cluster, tiny_llama_dir, small_beir, tmp_path, capsys):
    queries = small_beir / "queries.jsonl"
    first, *rest = queries.read_text().splitlines()
    qid = json.loads(first)["_id"]
    queries.write_text("\n".join([json.dumps({**json.loads(first), "answers": []}), *rest]) + "\n")
    # the driver reads the data and never scores it: only the worker that labels the first chunk finds the gap
    code = main(label_args(tiny_llama_dir, small_beir, tmp_path / "ray.jsonl", "--missing-answers", "error",
                           "--executor", "ray", "--workers", "1"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"error: {queries}: query {qid!r} has no answers (--target answer or --missing-answers error); use --missing-answers query or generate\n"


def test_a_bug_in_a_worker_keeps_its_own_type_and_the_workers_traceback(cluster, tmp_path):
    from distill.stages.executor import ExecutorSettings, run_on_ray

    stage = SimpleNamespace(n_units=4, desc="test", unit="unit")  # what the driver reads of a stage
    with pytest.raises(ValueError) as raised:  # the stage factory fails in the actor, as a bug would
        run_on_ray(stage, functools.partial(int, "not a number"), tmp_path / "out.jsonl", {}, chunk_size=2,
                   overwrite=False, show_progress=False, executor=ExecutorSettings(executor="ray", workers=1))
    assert type(raised.value) is ValueError, type(raised.value)  # not Ray's RayTaskError(ValueError)
    assert str(raised.value) == "invalid literal for int() with base 10: 'not a number'"
    remote = str(raised.value.__cause__)  # what the traceback shows above the driver's own frames
    assert "ray::StageWorker.run_part()" in remote and "stage = self.factory()" in remote, remote


def test_a_ray_address_where_no_cluster_answers_is_one_line_at_once(tiny_llama_dir, small_beir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.time()
    driver = _distill(label_args(tiny_llama_dir, small_beir, tmp_path / "ray.jsonl", "--executor", "ray",
                                 "--ray-address", f"127.0.0.1:{port}"))
    printed, err = driver.communicate(timeout=300)
    assert driver.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: no Ray cluster answers at 127.0.0.1:{port} (from --ray-address): "
                                            "start one there (`ray start --head`), or give the address of one that "
                                            "runs")
    assert time.time() - started < 120  # Ray alone retries for minutes


def _first_test_queries(folder: Path, n: int) -> Path:
    """squad-mini (its whole corpus) with its first `n` test queries."""
    source = ROOT / "distill" / "resources" / "squad_mini"
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(source / "corpus.jsonl", folder / "corpus.jsonl")
    header, *rows = (source / "qrels" / "test.tsv").read_text().splitlines()
    qids = set(list(dict.fromkeys(r.split("\t")[0] for r in rows))[:n])
    (folder / "qrels" / "test.tsv").write_text("\n".join([header, *(r for r in rows if r.split("\t")[0] in qids)]))
    (folder / "queries.jsonl").write_text("".join(line + "\n" for line in (source / "queries.jsonl").read_text()
                                                  .splitlines() if json.loads(line)["_id"] in qids))
    return folder


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_driver_outlives_its_test():
    yield
    while STARTED:  # a test that failed half way leaves no `distill` process running
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def _distill(args: list[str], output=subprocess.PIPE, **env: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    STARTED.append(subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, stdout=output,
                                    stderr=output, text=True))
    return STARTED[-1]


def _ray_label(llm: Path, data: Path, out: Path, address: str, output=subprocess.PIPE,
               workers: int = 2) -> subprocess.Popen:
    return _distill(label_args(llm, data, out, "--executor", "ray", "--workers", str(workers), "--ray-address",
                               address), output)


def _parts_progress(out: Path) -> dict[str, dict]:
    found = {}
    for progress in sorted(Path(str(out) + ".parts").glob("part-*.jsonl.progress.json")):
        try:
            found[progress.name] = json.loads(progress.read_text())
        except (OSError, ValueError):  # being replaced right now
            pass
    return found


def _wait_for(condition, process: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert process.poll() is None, f"the driver ended before {what}: {process.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)


def _worker_pids() -> list[int]:
    """This test process's Ray actors (the module cluster's raylet is its child), not another user's."""
    return [p.pid for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::StageWorker")]


def test_a_killed_worker_or_driver_costs_time_not_records(cluster, tiny_llama_dir, tmp_path):
    data = _first_test_queries(tmp_path / "data", 120)  # 60 chunks of 2 queries: 15 parts of 4 chunks
    reference = tmp_path / "local.jsonl"
    assert main(label_args(tiny_llama_dir, data, reference)) == 0
    out = tmp_path / "ray.jsonl"
    # kill -9 one worker once it has written a chunk: Ray restarts it, its part resumes
    driver = _ray_label(tiny_llama_dir, data, out, cluster, subprocess.DEVNULL)
    _wait_for(lambda: any(p["units_done"] for p in _parts_progress(out).values()), driver, "chunk")
    workers = _worker_pids()
    assert workers, "no Ray worker process to kill"
    os.kill(workers[0], signal.SIGKILL)
    # then kill -9 the driver once two parts are complete and others are not, and rerun it
    _wait_for(lambda: sum(p["complete"] for p in _parts_progress(out).values()) >= 2, driver, "2 complete parts")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    for pid in _worker_pids():  # the dead driver's actors die with it; make sure before the rerun
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    parts = _parts_progress(out)
    complete = sorted(name for name, progress in parts.items() if progress["complete"])
    assert complete and len(complete) < 15, complete
    # the dead driver's lock is still there: stale, it must not block the rerun
    assert _lock_holder(out) == driver.pid
    # a complete part's first chunk edited to other bytes of the same size: the last chunk's digest cannot see it
    edited = out.with_name("ray.jsonl.parts") / complete[0].removesuffix(".progress.json")
    text = edited.read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    edited.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])
    # resumed with one worker: the parts are the job's, not the cluster's
    rerun = _ray_label(tiny_llama_dir, data, out, cluster, workers=1)
    printed, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    assert f"ray: {edited.name} was changed or damaged after it was written: doing it again" in printed
    skipped = re.search(r"ray: (\d+) of 15 parts already complete", printed)
    assert skipped and int(skipped.group(1)) == len(complete) - 1, printed  # none done again but the edited one
    assert not (tmp_path / "ray.jsonl.lock").exists()


def _lock_holder(output: Path) -> int | None:
    try:
        return json.loads(Path(str(output) + ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):  # not there yet, or being written
        return None


def _processes_below(pid: int) -> list[psutil.Process]:
    """The processes below `pid` now, each with its command line kept (`.info["cmdline"]`) for after it is gone."""
    found = psutil.Process(pid).children(recursive=True)
    for process in found:
        try:
            process.info = {"cmdline": process.cmdline()}
        except psutil.NoSuchProcess:
            process.info = {"cmdline": []}
    return found


def _alive(processes: list[psutil.Process]) -> list[str]:
    found = []
    for process in processes:
        try:  # is_running compares the start time too: a reused pid is not the same process
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {process.name()}")
        except psutil.NoSuchProcess:
            pass
    return found


def test_two_jobs_on_one_machine_neither_joins_nor_outlives_the_other(tiny_llama_dir, tmp_path):
    """No cluster given: each driver starts its own (on today's code the second joined the first's, and died
    after 'Failed to connect to GCS' when the first ended). A third driver on the first's output is refused up
    front, naming the first; after kill -9 of the first, nothing it started is left running."""
    import torch

    second_data = _first_test_queries(tmp_path / "short", 60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = tmp_path / "local.jsonl"
        assert main(label_args(tiny_llama_dir, second_data, reference)) == 0
    finally:
        torch.set_num_threads(threads)
    no_ray_start = {"RAY_TMPDIR": str(tmp_path / "ray-tmp")}  # no `ray start` cluster of this machine to join
    (tmp_path / "ray-tmp").mkdir()
    first_out, second_out = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first_args = label_args(tiny_llama_dir, _first_test_queries(tmp_path / "long", 200), first_out, "--executor",
                            "ray", "--workers", "1", "--num-random", "63")  # long enough to be killed
    first = _distill(first_args, **no_ray_start)
    _wait_for(lambda: _lock_holder(first_out) == first.pid, first, "lock", timeout_s=120)
    same_output = _distill(first_args, **no_ray_start)
    printed, err = same_output.communicate(timeout=300)
    assert same_output.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(rf"error: {re.escape(str(first_out))} is being written by another distill job \(pid "
                        rf"{first.pid} on {re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d "
                        r"\d\d:\d\d:\d\d [+-]\d{4}\): wait for it to end, or stop it and rerun this command to "
                        r"resume its work", err.strip().splitlines()[-1]), err
    second = _distill(label_args(tiny_llama_dir, second_data, second_out, "--executor", "ray", "--workers", "1"),
                      **no_ray_start)
    for driver, out in ((first, first_out), (second, second_out)):
        _wait_for(lambda: any(p["units_done"] for p in _parts_progress(out).values()), driver, "chunk")
    assert first.poll() is None and second.poll() is None, "a job ended before the first was killed: make it longer"
    started_by_first = _processes_below(first.pid)
    assert any(p.name() == "raylet" for p in started_by_first), [p.name() for p in started_by_first]
    first.send_signal(signal.SIGKILL)
    first.wait()
    printed, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert second_out.read_bytes() == reference.read_bytes()
    deadline = time.time() + 60
    while _alive(started_by_first) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(started_by_first), _alive(started_by_first)
    supervisor = next(p for p in started_by_first if "distill.stages.ray_cluster" in p.info["cmdline"])
    assert not Path(supervisor.info["cmdline"][-1]).exists()  # the private cluster's temp dir is removed too
