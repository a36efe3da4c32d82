"""A manifest records its process; a reader tells a killed run (``running``, process gone) from a
live one, and a resumed run's sessions add up to its total time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from esa.errors import UsageError
from esa.outdir import process
from esa.outdir.layout import claim_out_dir, describe_run
from esa.outdir.manifest import Manifest
from esa.reporting.format import run_text


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def running(proc: dict) -> dict:
    return {"status": "running", "error": None, "started_at": "2026-01-01T10:00:00+0000", "wall_time_s": 3.0,
            "process": proc}


def test_the_manifest_records_its_process(tmp_path):
    Manifest(tmp_path)
    p = json.loads((tmp_path / "experiment_manifest.json").read_text())["process"]
    assert p["pid"] == os.getpid() and p["host"] and p["started_at"]
    assert p["proc_start"] is None or isinstance(p["proc_start"], int)
    assert process.alive(p) is True


def test_running_with_its_process_gone_reads_killed(dead_pid):
    me = process.process_record(time.time())
    assert process.status_of(running(me)) == "running"  # alive: a run in progress
    assert process.status_of(running({**me, "pid": dead_pid})) == "killed"  # SIGKILL, OOM or a full disk
    if me["proc_start"] is not None:  # the pid now belongs to another process (another start time)
        assert process.status_of(running({**me, "proc_start": me["proc_start"] + 1})) == "killed"
    assert process.status_of(running({**me, "host": "another-host", "pid": dead_pid})) == "running"  # can't tell
    assert process.status_of({"status": "running"}) == "running"  # a manifest from before processes were recorded
    assert "killed" in process.ended(running({**me, "pid": dead_pid}))


def test_describe_run_and_claim_out_dir_read_the_process(tmp_path, dead_pid):
    (tmp_path / "config.json").write_text(json.dumps({"config": {"model": "m", "metric": "magnitude",
                                                                 "mode": "global", "topk": 3}}))
    manifest = tmp_path / "experiment_manifest.json"
    manifest.write_text(json.dumps(running({**process.process_record(time.time()), "pid": dead_pid})))
    assert "status killed (its manifest says running, but its process is gone)" in describe_run(tmp_path)
    assert claim_out_dir(tmp_path, resume=True) == tmp_path  # a killed run can be resumed
    manifest.write_text(json.dumps(running(process.process_record(time.time()))))
    for kw in ({"resume": True}, {"overwrite": True}):  # a live run owns its out-dir
        with pytest.raises(UsageError, match="still running"):
            claim_out_dir(tmp_path, **kw)


def test_a_resumed_runs_sessions_add_up(tmp_path, dead_pid):
    before = running({**process.process_record(time.time() - 100), "pid": dead_pid})
    before["started_at"] = time.strftime(process.TIME_FORMAT, time.localtime(time.time() - 100))
    (tmp_path / "experiment_manifest.json").write_text(json.dumps(before))
    (tmp_path / "config.json").write_text("{}")  # the run's last file, written just now: ~100 s after its start
    m = Manifest(tmp_path, resume={"seeds_done": [0]})
    resume = m.data["resumes"][0]
    assert resume["previous_status"] == "killed" and resume["previous_process"]["pid"] == dead_pid
    assert 95 < resume["previous_session_s"] < 130  # until its last file, not the 3 s its manifest last said
    m.finish("success")
    data = json.loads((tmp_path / "experiment_manifest.json").read_text())
    assert data["total_wall_time_s"] == pytest.approx(resume["previous_session_s"] + data["wall_time_s"])
    text = run_text(data)
    assert text.startswith(f"success after {data['total_wall_time_s']:.0f} s over 2 sessions (started ")
    assert f"killed after {resume['previous_session_s']:.0f} s; resumed {resume['at']}, success after" in text
