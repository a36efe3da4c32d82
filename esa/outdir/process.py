"""Which process a run is, and whether a manifest that says ``running`` still has one.

A run's manifest records its process (:func:`process_record`: host, pid, the OS's start time of the
process and when the run started).  A run killed by SIGKILL, the OOM killer or a full disk never
records its end, so its manifest says ``running`` for ever; :func:`status_of` reads such a manifest
as ``killed`` when the recorded process is gone (or its pid now belongs to another process).  On
another host nothing can be checked, and the recorded status stands.

:func:`sessions` turns a manifest (the first run and each ``--resume``) into the sessions it
took, so that a report can name each resume and the total time.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), else None: with
    the pid it identifies a process even after the pid is reused."""
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces


def process_record(started: float) -> dict:
    """This process, for the manifest: host, pid, its OS start time and when the run started."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started_at": time.strftime(TIME_FORMAT, time.localtime(started))}


def alive(process: dict | None) -> bool | None:
    """Whether the recorded process still runs: None when it cannot be told (no record, another host)."""
    if not process or process.get("host") != socket.gethostname():
        return None
    pid = int(process["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    recorded, now = process.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now  # another start time: the pid was reused


def status_of(manifest: dict) -> str:
    """The manifest's status, ``killed`` for a ``running`` one whose process is gone."""
    status = manifest.get("status", "unknown")
    if status == "running" and alive(manifest.get("process")) is False:
        return "killed"
    return status


def ended(manifest: dict) -> str:
    """How the session a manifest records ended, as a phrase for ``--resume``'s message."""
    status, p = status_of(manifest), manifest.get("process") or {}
    if status == "killed":
        return (f"was killed: its manifest says running, but its process {p.get('pid')} on {p.get('host')} is gone "
                "(a kill, out of memory or a full disk: nothing could record the end)")
    if status == "running":
        return f"says running (process {p.get('pid', '?')} on {p.get('host', '?')}, which cannot be checked from here)"
    return f"ended {status}" + (f" ({manifest['error']})" if manifest.get("error") else "")


def parse_time(text: str) -> float:
    return datetime.strptime(text, TIME_FORMAT).timestamp()


def sessions(manifest: dict) -> list[dict]:
    """Each session of a run: ``{"started_at", "status", "seconds"}`` for the first start and each
    ``--resume`` (a resume records how the session before it ended and how long it ran)."""
    resumes = manifest.get("resumes") or []
    starts = [manifest.get("started_at"), *(r.get("at") for r in resumes)]
    ends = [(r.get("previous_status"), r.get("previous_session_s")) for r in resumes]
    ends.append((status_of(manifest), manifest.get("wall_time_s")))
    return [{"started_at": s, "status": st, "seconds": sec} for s, (st, sec) in zip(starts, ends)]
