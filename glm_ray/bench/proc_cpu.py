"""CPU time (and resident memory) of every process of this user, by role, read from /proc (Linux).

A stage of the breakdown takes one snapshot before and one after; the difference, per role, is the
CPU that role burned on the stage (user + system, all threads). Ray names its workers with their
actor, so a Serve replica's process title says which deployment it runs
(`ray::ServeReplica:APP:AttentionReplica`); the proxy, controller, raylet and GCS are named too.
A process that started during the stage counts from zero; one that ended during it is missed,
which is why the stages run on a cluster that is already up.
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def role_of(pid: int, cmdline: str, comm: str, own_pid: int) -> str:
    """A stable name for what the process does: the deployment of a Serve replica, Ray's daemons by
    name, this process as the bench client, anything else as `other`."""
    if pid == own_pid:
        return "bench client"
    if cmdline.startswith("ray::"):
        title = cmdline.split()[0][5:]
        if title.startswith("ServeReplica:"):
            return title.rsplit(":", 1)[-1]  # the deployment
        if title.startswith(("ProxyActor", "ServeController")):
            return title.split(":")[0]
        return "ray worker (" + title.split(".")[0] + ")"
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env_agent"):
        if daemon in comm or daemon in cmdline.split(" ")[0]:
            return daemon
    if "default_worker.py" in cmdline:  # a worker not yet titled
        return "ray worker (idle)"
    return "other"


def _read(pid_dir: Path) -> tuple[str, str, float, int] | None:
    try:
        stat = (pid_dir / "stat").read_text()
        cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # gone, or not ours to read
        return None
    # comm is in parentheses and may hold spaces: the fields after it start at the last ')'
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss_pages = int(fields[21])  # field 24
    return cmdline, comm, (utime + stime) / CLOCK_TICKS, rss_pages * PAGE_BYTES


def processes(uid: int | None = None) -> dict[int, tuple[str, float, int]]:
    """{pid: (role, CPU seconds so far, resident bytes)} for every process of `uid` (default: ours)."""
    uid = os.getuid() if uid is None else uid
    own = os.getpid()
    out = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if pid_dir.stat().st_uid != uid:
                continue
        except OSError:
            continue
        read = _read(pid_dir)
        if read is not None:
            cmdline, comm, cpu, rss = read
            out[int(pid_dir.name)] = (role_of(int(pid_dir.name), cmdline, comm, own), cpu, rss)
    return out


def snapshot(uid: int | None = None) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} for every process of `uid` (default: ours)."""
    return {pid: (role, cpu) for pid, (role, cpu, _) in processes(uid).items()}


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two snapshots, largest first (roles under 10 ms left out)."""
    spent: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        prior = before.get(pid)
        used = cpu - prior[1] if prior is not None else cpu  # a worker retitled as a replica is one process
        spent[role] = spent.get(role, 0.0) + max(used, 0.0)
    return dict(sorted(((r, s) for r, s in spent.items() if s >= 0.01), key=lambda kv: -kv[1]))
