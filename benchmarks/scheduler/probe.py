"""Watches one `mopd-train` run from outside: its student engines' load and when each step's record lands.

The same measurement for every mode, whatever its driver reports: every `interval_s` the probe reads each
student engine's `/metrics` (rollout/hf_server.py: requests running and queued, forward steps so far) and
counts the lines of the run's metrics.jsonl, so a step's wall-clock end is known without the driver's help.
Student engines are found as `rollout.hf_server` processes below the run's process whose `--model-path`
is not a teacher's (the ports come from their command lines).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tick:
    t: float
    running: dict[str, int]  # engine url -> requests in its running batch
    forward_steps: dict[str, int]  # engine url -> forward steps since it started


@dataclass
class ProbeLog:
    ticks: list[Tick] = field(default_factory=list)
    line_times: list[float] = field(default_factory=list)  # when metrics.jsonl line i appeared


def _descendants(root: int) -> list[int]:
    """Every process below `root` (parent links from /proc/PID/stat)."""
    parent: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])  # the command name may hold spaces and parentheses
        parent.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        children = parent.get(todo.pop(), [])
        out += children
        todo += children
    return out


def student_engine_urls(root_pid: int, teacher_paths: set[str]) -> list[str]:
    """URLs of the local engines started below `root_pid` that serve the student (not a teacher)."""
    urls = []
    for pid in _descendants(root_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "rollout.hf_server" not in argv or "--port" not in argv or "--model-path" not in argv:
            continue
        if str(Path(argv[argv.index("--model-path") + 1]).resolve()) in teacher_paths:
            continue
        host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
        urls.append(f"http://{host}:{argv[argv.index('--port') + 1]}")
    return sorted(urls)


def _read_metrics(url: str) -> dict[str, int] | None:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=0.5) as r:
            text = r.read().decode()
    except OSError:
        return None  # not up yet, restarting, or gone
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = int(float(value))
    return values


class Probe:
    """A background thread sampling a run until `stop()`; `log` holds what it saw."""

    def __init__(self, root_pid: int, metrics_path: Path, teacher_paths: list[Path], interval_s: float = 0.05):
        self.root_pid, self.metrics_path, self.interval_s = root_pid, metrics_path, interval_s
        self.teacher_paths = {str(Path(p).resolve()) for p in teacher_paths}
        self.log = ProbeLog()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler-bench-probe", daemon=True)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> ProbeLog:
        self._stop.set()
        self._thread.join()
        return self.log

    def _run(self) -> None:
        urls: list[str] = []
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now >= next_scan:  # engines appear after start-up (and again if Ray restarts one)
                urls = student_engine_urls(self.root_pid, self.teacher_paths) or urls
                next_scan = now + 1.0
            self._count_lines(now)
            running, steps = {}, {}
            for url in urls:
                m = _read_metrics(url)
                if m is not None:
                    running[url] = m["hf_server_num_running_reqs"]
                    steps[url] = m["hf_server_num_forward_steps"]
            if running:
                self.log.ticks.append(Tick(now, running, steps))
            self._stop.wait(max(0.0, self.interval_s - (time.time() - now)))
        self._count_lines(time.time())

    def _count_lines(self, now: float) -> None:
        try:
            n = self.metrics_path.read_bytes().count(b"\n")
        except OSError:
            return
        self.log.line_times += [now] * (n - len(self.log.line_times))
