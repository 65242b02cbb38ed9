"""`--executor ray` on a real local Ray cluster (2 CPUs, shared by these tests): label, generate and mine give
the bytes `--executor local` gives (both with one torch thread per process), a worker killed with SIGKILL is
restarted and the job still gives those bytes, and a killed driver reruns without redoing a complete part."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.cli import main

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed") if not os.environ.get("CI") else \
    __import__("ray")
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


def _first_test_queries(folder: Path, n: int) -> Path:
    """squad-mini (its whole corpus) with its first `n` test queries."""
    import shutil

    source = ROOT / "distill" / "resources" / "squad_mini"
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(source / "corpus.jsonl", folder / "corpus.jsonl")
    header, *rows = (source / "qrels" / "test.tsv").read_text().splitlines()
    qids = set(list(dict.fromkeys(r.split("\t")[0] for r in rows))[:n])
    (folder / "qrels" / "test.tsv").write_text("\n".join([header, *(r for r in rows if r.split("\t")[0] in qids)]))
    (folder / "queries.jsonl").write_text("".join(line + "\n" for line in (source / "queries.jsonl").read_text()
                                                  .splitlines() if json.loads(line)["_id"] in qids))
    return folder


def _ray_label(llm: Path, data: Path, out: Path, address: str, output=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "distill", *label_args(llm, data, out, "--executor", "ray",
                                                                          "--workers", "2", "--ray-address", address)],
                            env=env, stdout=output, stderr=output, text=True)


def _parts_progress(out: Path) -> dict[str, dict]:
    found = {}
    for progress in sorted(Path(str(out) + ".parts").glob("part-*.jsonl.progress.json")):
        try:
            found[progress.name] = json.loads(progress.read_text())
        except (OSError, ValueError):  # being replaced right now
            pass
    return found


def _worker_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::StageWorker"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_a_killed_worker_or_driver_costs_time_not_records(cluster, tiny_llama_dir, tmp_path):
    data = _first_test_queries(tmp_path / "data", 120)  # 60 chunks of 2 queries, 8 parts of 8 chunks or fewer
    reference = tmp_path / "local.jsonl"
    assert main(label_args(tiny_llama_dir, data, reference)) == 0
    out = tmp_path / "ray.jsonl"
    # kill -9 one worker once it has written a chunk: Ray restarts it, its part resumes
    driver = _ray_label(tiny_llama_dir, data, out, cluster, subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(p["units_done"] for p in _parts_progress(out).values()) and time.time() < deadline \
            and driver.poll() is None:
        time.sleep(0.05)
    workers = _worker_pids()
    assert workers, "no Ray worker process to kill"
    os.kill(workers[0], signal.SIGKILL)
    # then kill -9 the driver once a part is complete and others are not, and rerun it
    while not any(p["complete"] for p in _parts_progress(out).values()) and time.time() < deadline \
            and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, "the driver finished before it could be killed; make the job longer"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    for pid in _worker_pids():  # the dead driver's actors die with it; make sure before the rerun
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    complete = {name for name, progress in _parts_progress(out).items() if progress["complete"]}
    assert complete and len(complete) < 8, complete
    rerun = _ray_label(tiny_llama_dir, data, out, cluster)
    printed, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    skipped = int(printed.split("ray: ")[1].split(" of ")[0])
    assert skipped >= len(complete)  # no complete part was done again
