"""Benchmark our server against a bare Flask stream under the same gunicorn, on this machine.

    python bench/run.py                        # C = 100, 1000, 5000 (3-4 minutes on 2 cores)
    python bench/run.py --quick                # C = 20, 100, fewer polls (under a minute)
    python bench/run.py --concurrency 100,1000 --out bench/results/mine.json

For every phase a fresh server starts under gunicorn (1 gevent worker, 12,000 worker
connections, backlog 4096, 127.0.0.1 port 0, SQLite in a temporary folder): OURS is
``agent_runs:create_app()`` with a benchmark agent on the ``scripted`` model (one tool call,
50 content deltas 20 ms apart); BASELINE is ``bench/baseline.py``, a bare Flask app that
streams the same frames at the same pacing and does nothing else. The load client
(``bench/load.py``) runs in its own process. See bench/README.md for what each figure means.

Results go to a JSON file (``bench/results/<timestamp>.json`` unless ``--out``) and a table
on stdout; ``python bench/chart.py RESULTS.json`` draws the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

from stats import percentiles

BENCH = Path(__file__).resolve().parent
# Both servers run with the project's gunicorn settings (its worker hooks included); the command
# line below overrides what the benchmark sets itself.
GUNICORN_CONF = BENCH.parent / "gunicorn.conf.py"
LOAD = BENCH / "load.py"
LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
PY_SPY = shutil.which("py-spy") or "py-spy"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# floor: the baseline's endpoints as a bare WSGI callable, to show what gunicorn itself costs.
# nometrics: ours with its Prometheus metrics turned off, to show what counting costs.
TARGETS = ("ours", "baseline", "floor", "nometrics")
OURS = ("ours", "nometrics")
# The load client's one token stands for thousands of callers: the per-token rate limit and
# the per-organisation cap on active runs would turn most of its streams into 429s.
OURS_LIMITS_OFF = {"AGENT_RUNS_RATE_LIMIT": "0", "AGENT_RUNS_MAX_ACTIVE_RUNS_PER_ORG": "0"}
GUNICORN_SETTINGS = {
    "worker_class": "gevent",
    "workers": 1,
    "worker_connections": 12_000,
    "backlog": 4096,
    "timeout": 60,
    "graceful_timeout": 10,
    "keepalive": 5,
}


@dataclass(frozen=True)
class Shape:
    """What every stream of a phase looks like: deltas, pacing and the message size."""

    agent: str
    deltas: int
    delay: float
    message_length: int

    @property
    def events(self) -> int:
        # START, two REASONING_DELTA, TOOL_START, TOOL_END, the deltas, STOP.
        return self.deltas + 6


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# /proc ---------------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """Return utime + stime of the processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        # After the command name: state is field 3, utime 14 and stime 15 (1-based).
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """Return the resident set size of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as file:
            return int(file.read().split()[1]) * PAGE_KB
    except FileNotFoundError:
        return 0


class RssSampler:
    """Sample a process's RSS every ``interval`` seconds in a thread; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_kb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kb(self.pid))


class Profiler:
    """``with Profiler(pid, path):`` records the process's stacks with py-spy while it runs.

    Raw collapsed stacks (``frame;frame;... count``) go to ``path``; :func:`profile_summary`
    turns them into the functions that cost the most. py-spy samples 100 times a second
    without stopping the process, but it takes CPU of its own: figures of a profiled run are
    a little worse.
    """

    def __init__(self, pid: int, path: Path | None) -> None:
        self.pid, self.path = pid, path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        if self.path is not None:
            self.process = subprocess.Popen(
                [
                    PY_SPY,
                    "record",
                    "--pid",
                    str(self.pid),
                    "--rate",
                    "100",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(self.path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def profile_summary(path: Path, top: int = 15) -> dict:
    """Return the functions with the most samples, on their own (self) and with callees."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not path.exists():
        return {"samples": 0, "self": [], "inclusive": [], "inclusive_app": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n

    def ranked(counts: dict[str, int]) -> list[list]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [[frame, round(100 * n / total, 1)] for frame, n in best]

    # The application's own frames and its database layer, below gunicorn's and Flask's.
    ours = {f: n for f, n in inclusive.items() if re.search(r"\((app|agent_runs)/|peewee", f)}
    return {
        "samples": total,
        "self": ranked(own),
        "inclusive": ranked(inclusive),
        "inclusive_app": ranked(ours),
    }


# Servers -------------------------------------------------------------------------------------


def agents_file(
    folder: Path, paced: Shape, fast: Shape, model: str = "scripted", base_url: str = ""
) -> Path:
    """Write the benchmark agents: on the scripted model, or (``openai``, ``anthropic``) on
    the fake model server at ``base_url`` (see bench/fake_model.py)."""
    path = folder / "agents.yaml"
    entries = []
    for shape in (paced, fast):
        if model != "scripted":
            name = f"{model}:bench-{shape.deltas}-{shape.delay}"
            options = f"{{base_url: '{base_url}', api_key: bench, max_retries: 0}}"
        else:
            name = "scripted"
            options = f"{{delay: {shape.delay}, content_deltas: {shape.deltas}}}"
        entries.append(
            f"""  - id: {shape.agent}
    name: Benchmark agent {shape.agent}
    description: Calls echo once, then answers in {shape.deltas} content deltas.
    instructions: Call echo with the message, then answer.
    model: {name}
    model_options: {options}
    tools:
      - bench_tools:echo
"""
        )
    path.write_text("agents:\n" + "".join(entries))
    return path


def bench_token(env: dict[str, str], folder: Path) -> str:
    """Create a token for organisation "bench" in the server's database; return its secret."""
    created = subprocess.run(
        [sys.executable, "-m", "agent_runs", "tokens", "create", "--org", "bench"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=folder,
    )
    return created.stdout.strip().splitlines()[-1]


class Server:
    """``with Server(target, folder, ...) as server:`` runs one gunicorn until the block ends.

    The server is always torn down: SIGTERM to the master, then SIGKILL to master and worker
    if they are still there after a grace period.
    """

    def __init__(
        self, target: str, folder: Path, paced: Shape, fast: Shape, model: str = "scripted"
    ) -> None:
        self.target = target
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paced, self.fast = paced, fast
        # Ours on a model over HTTP: the fake model server runs as long as this server.
        self.model = model if target in OURS else "scripted"
        self.model_process: subprocess.Popen | None = None
        self.log_path = folder / "gunicorn.log"
        self.db_path = folder / "bench.sqlite3"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p
            ),
            # No access log: thousands of lines a second would measure the log, not the server.
            "AGENT_RUNS_ACCESS_LOG": "",
        }
        if target in OURS:
            self.env.update(
                AGENT_RUNS_DATABASE_URL=f"sqlite:///{self.db_path}",
                AGENT_RUNS_SHUTDOWN_TIMEOUT="5",
                AGENT_RUNS_METRICS="false" if target == "nometrics" else "true",
                **OURS_LIMITS_OFF,
            )
        self.process: subprocess.Popen | None = None
        self.worker_pid = 0
        self.url = ""
        self.token = ""

    @property
    def app(self) -> str:
        if self.target in OURS:
            return "agent_runs:create_app()"
        return "baseline:floor" if self.target == "floor" else "baseline:app"

    @property
    def pids(self) -> list[int]:
        return [p for p in (self.process.pid if self.process else 0, self.worker_pid) if p]

    def __enter__(self) -> Server:
        try:
            if self.target in OURS:
                base_url = self._start_model() if self.model != "scripted" else ""
                self.env["AGENT_RUNS_AGENTS_FILE"] = str(
                    agents_file(self.folder, self.paced, self.fast, self.model, base_url)
                )
                self.token = bench_token(self.env, self.folder)
            argv = [sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONF)]
            for name, value in GUNICORN_SETTINGS.items():
                # keepalive is --keep-alive on gunicorn's command line
                flag = "--keep-alive" if name == "keepalive" else "--" + name.replace("_", "-")
                argv += [flag, str(value)]
            argv += ["--no-control-socket", "--log-level", "info", "--bind", "127.0.0.1:0"]
            argv.append(self.app)
            with open(self.log_path, "wb") as log_file:
                self.process = subprocess.Popen(
                    argv,
                    env=self.env,
                    cwd=self.folder,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    # Its own session: a Ctrl-C reaches run.py, which tears the server down.
                    start_new_session=True,
                )
            self._wait_until_serving()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_serving(self, timeout: float = 60) -> None:
        """Wait for the port, an HTTP answer, and the worker's pid."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                try:
                    with urllib.request.urlopen(self.url + "/api/agents", timeout=2):
                        pass
                except urllib.error.HTTPError as answer:
                    answer.close()  # 401 without a token: the worker answers
                except OSError:
                    time.sleep(0.05)
                    continue
                children = Path(
                    f"/proc/{self.process.pid}/task/{self.process.pid}/children"
                ).read_text()
                if children.split():
                    self.worker_pid = int(children.split()[0])
                    return
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.target} server did not start:\n{self.log_path.read_text(errors='replace')}"
        )

    def _start_model(self) -> str:
        """Start bench/fake_model.py; return its base URL for this server's model."""
        self.model_process = subprocess.Popen(
            [sys.executable, str(BENCH / "fake_model.py")],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.model_process.stdout is not None
        port = self.model_process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError("the fake model server did not start")
        root = f"http://127.0.0.1:{port}"
        return f"{root}/v1" if self.model == "openai" else root

    def __exit__(self, *exc_info: object) -> None:
        if self.model_process is not None:
            self.model_process.kill()
            self.model_process.wait()
            self.model_process = None
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=GUNICORN_SETTINGS["graceful_timeout"] + 5)
        except subprocess.TimeoutExpired:
            log(f"{self.target} server ignored SIGTERM; killing it")
            for pid in (self.worker_pid, process.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            process.wait()

    def stream_path(self, shape: Shape) -> str:
        path = f"/api/agents/{shape.agent}/runs/stream"
        if self.target not in OURS:
            path += f"?deltas={shape.deltas}&delay={shape.delay}"
        return path

    def status_path(self, shape: Shape) -> str:
        return f"/api/agents/{shape.agent}/runs/status"


# Load ----------------------------------------------------------------------------------------


class LoadProcess:
    """One run of bench/load.py; its stdout lines arrive on a queue."""

    def __init__(self, folder: Path, name: str, args: list[str], deadline: float) -> None:
        self.out = folder / f"{name}.json"
        self.deadline = deadline
        self.lines: queue.Queue[str] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, str(LOAD), *args, "--deadline", str(deadline), "--out", str(self.out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    return None
                continue
            if line.startswith(prefix):
                return line[len(prefix) :]
        return None

    def result(self) -> dict:
        try:
            self.process.wait(timeout=self.deadline + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(
                f"the load client overran its deadline ({self.deadline} s)"
            ) from None
        finally:
            if self.process.poll() is None:
                self.process.kill()
        if self.process.returncode != 0 or not self.out.exists():
            raise RuntimeError(f"the load client failed (exit {self.process.returncode})")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def stream_args(server: Server, shape: Shape, concurrency: int) -> list[str]:
    args = [
        "streams",
        "--url",
        server.url,
        "--path",
        server.stream_path(shape),
        "--concurrency",
        str(concurrency),
        "--message-length",
        str(shape.message_length),
        "--expected-events",
        str(shape.events),
    ]
    return args + (["--token", server.token] if server.token else [])


def status_args(server: Server, shape: Shape, ids_file: Path, polls: int) -> list[str]:
    args = [
        "status",
        "--url",
        server.url,
        "--path",
        server.status_path(shape),
        "--ids-file",
        str(ids_file),
        "--polls",
        str(polls),
    ]
    return args + (["--token", server.token] if server.token else [])


def stream_deadline(shape: Shape, concurrency: int, options: argparse.Namespace) -> float:
    """A phase's time bound: generous for a slow server, finite whatever happens."""
    budget = 60 + concurrency * shape.events * options.budget_us_per_event / 1e6
    return round(min(budget, options.max_phase_seconds), 1)


def measure_streams(
    server: Server, shape: Shape, concurrency: int, name: str, options: argparse.Namespace
) -> dict:
    """Run one stream phase with server CPU and RSS around it."""
    deadline = stream_deadline(shape, concurrency, options)
    profile = None
    if options.profile_dir is not None:
        profile = options.profile_dir / f"{server.folder.name}-{name}.txt"
    cpu_before = cpu_seconds(server.pids)
    rss_before = rss_kb(server.worker_pid)
    with RssSampler(server.worker_pid) as sampler, Profiler(server.worker_pid, profile):
        load = LoadProcess(server.folder, name, stream_args(server, shape, concurrency), deadline)
        try:
            result = load.result()
        finally:
            load.kill()
        # Work the server finishes after the last STOP (closing sockets, a last flush).
        time.sleep(0.3)
    cpu = cpu_seconds(server.pids) - cpu_before
    events = result["events"]
    result.update(
        server_cpu_s=cpu,
        cpu_us_per_event=cpu / events * 1e6 if events else None,
        rss_before_kb=rss_before,
        rss_peak_kb=sampler.peak,
        mem_kb_per_stream=(sampler.peak - rss_before) / concurrency,
        mem_kb_per_peak_open=(sampler.peak - rss_before) / result["peak_open"]
        if result["peak_open"]
        else None,
        deadline_s=deadline,
    )
    if profile is not None:
        result["profile"] = {"file": str(profile), **profile_summary(profile)}
    return result


def warm_up(server: Server, shape: Shape) -> None:
    """Serve a few streams and a status poll, so first-use costs stay out of the figures."""
    result = LoadProcess(server.folder, "warmup", stream_args(server, shape, 10), 60).result()
    if result["completed"] != 10:
        raise RuntimeError(f"warm-up streams failed: {result['error_kinds']}")
    status = poll_status(server, shape, list(result["runs"]), 5, "warmup-status")
    if status["errors"]:
        raise RuntimeError(f"warm-up status polls failed: {status['error_kinds']}")


def poll_status(server: Server, shape: Shape, ids: list[str], polls: int, name: str) -> dict:
    ids_file = server.folder / f"{name}-ids.json"
    ids_file.write_text(json.dumps(ids[:100]))
    load = LoadProcess(server.folder, name, status_args(server, shape, ids_file, polls), 120)
    return load.result()


def persisted(db_path: Path, runs: dict[str, int], wait: float = 10) -> dict:
    """Compare the run_event rows of the phase's runs with the events the client received."""
    received = sum(runs.values())
    end = time.monotonic() + wait
    while True:
        with sqlite3.connect(db_path, timeout=30) as connection:
            connection.execute("CREATE TEMP TABLE ids (id TEXT PRIMARY KEY)")
            connection.executemany("INSERT INTO ids VALUES (?)", [(r,) for r in runs])
            counts = dict(
                connection.execute(
                    "SELECT run_id, COUNT(*) FROM run_event"
                    " WHERE run_id IN (SELECT id FROM ids) GROUP BY run_id"
                )
            )
            statuses = dict(
                connection.execute(
                    "SELECT status, COUNT(*) FROM run WHERE id IN (SELECT id FROM ids)"
                    " GROUP BY status"
                )
            )
        connection.close()
        rows = sum(counts.values())
        if rows >= received or time.monotonic() > end:
            break
        time.sleep(0.5)
    mismatched = [run for run, n in runs.items() if counts.get(run, 0) != n]
    return {
        "runs": len(runs),
        "events_received": received,
        "rows": rows,
        "runs_mismatched": len(mismatched),
        "run_status": statuses,
        "ok": rows == received and not mismatched,
    }


def without_samples(result: dict) -> dict:
    """Drop the per-stream and per-poll lists from a phase's result before saving it."""
    return {k: v for k, v in result.items() if k not in ("runs", "stream_spans", "samples")}


# Phases --------------------------------------------------------------------------------------


def concurrency_phase(
    target: str, concurrency: int, folder: Path, options: argparse.Namespace
) -> dict:
    with Server(target, folder, options.paced, options.fast, options.model) as server:
        warm_up(server, options.paced)
        log(f"{target}: {concurrency} streams")
        result = measure_streams(server, options.paced, concurrency, "streams", options)
        ids = list(result["runs"])
        if target in OURS:
            result["persisted"] = persisted(server.db_path, result["runs"])
        if len(ids) >= 1:
            status = poll_status(server, options.paced, ids, options.status_polls, "status")
            result["status"] = without_samples(status)
        return without_samples(result)


def saturation_phase(target: str, folder: Path, options: argparse.Namespace) -> dict:
    shape = options.fast
    with Server(target, folder, options.paced, shape, options.model) as server:
        warm_up(server, options.paced)
        log(f"{target}: saturation, {options.saturation_streams} streams x {shape.events} events")
        result = measure_streams(server, shape, options.saturation_streams, "fast", options)
        if target in OURS:
            result["persisted"] = persisted(server.db_path, result["runs"])
        return without_samples(result)


def status_during_phase(target: str, folder: Path, options: argparse.Namespace) -> dict:
    """Start paced streams, then poll batch status for 100 of their runs while they run."""
    shape, concurrency = options.paced, options.status_streams
    with Server(target, folder, shape, options.fast, options.model) as server:
        warm_up(server, shape)
        log(f"{target}: batch status during {concurrency} streams")
        deadline = stream_deadline(shape, concurrency, options)
        streams = LoadProcess(
            server.folder, "during-streams", stream_args(server, shape, concurrency), deadline
        )
        try:
            started = streams.wait_for_line("STARTED ", deadline)
            ids = json.loads(started) if started else []
            status = (
                poll_status(server, shape, ids, options.status_polls_during, "during-status")
                if ids
                else {"polls": 0, "errors": 0, "error_kinds": {}, "samples": []}
            )
            result = streams.result()
        finally:
            streams.kill()
        # How many streams were open when each poll was sent.
        spans = result["stream_spans"]
        open_at = []
        for wall, _ in status.get("samples", []):
            moment = wall - result["t0_wall"]
            open_at.append(sum(1 for start, end in spans if start <= moment < end))
        during = [
            ms for (_, ms), n in zip(status.get("samples", []), open_at, strict=True) if n > 0
        ]
        summary = {
            "streams": without_samples(result),
            "status": without_samples(status),
            "polls_during_streams": len(during),
            "latency_during_ms": percentiles(during),
            "open_streams_at_polls": percentiles([n for n in open_at if n > 0]),
        }
        if target in OURS:
            summary["persisted"] = persisted(server.db_path, result["runs"])
        return summary


# Report --------------------------------------------------------------------------------------


def ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or baseline in (None, 0):
        return None
    return ours / baseline


def figures(phase: dict) -> dict:
    """The headline figures of one stream phase."""
    status = phase.get("status") or {}
    return {
        "completed": phase["completed"],
        "errors": phase["errors"],
        "ttfe_p50_ms": phase["ttfe_ms"]["p50"],
        "ttfe_p99_ms": phase["ttfe_ms"]["p99"],
        "cpu_us_per_event": phase["cpu_us_per_event"],
        "mem_kb_per_stream": phase["mem_kb_per_stream"],
        "mem_kb_per_open_stream": phase.get("mem_kb_per_peak_open"),
        "peak_open": phase["peak_open"],
        "events_per_s": phase["events_per_s"],
        "status_p50_ms": (status.get("latency_ms") or {}).get("p50"),
        "status_p99_ms": (status.get("latency_ms") or {}).get("p99"),
        "persisted_ok": (phase.get("persisted") or {}).get("ok"),
    }


def summarise(results: dict) -> None:
    """Add figures, ratios and the issue's targets to the results."""
    phases = {t: results["phases"].get(t, {}) for t in TARGETS}
    summary: dict = {"concurrency": {}, "saturation": {}, "status_during": {}}
    ratios: dict = {"concurrency": {}, "saturation": {}, "status_during": {}, "metrics": {}}
    for c in results["settings"]["concurrency"]:
        key = str(c)
        per = {
            t: figures(phases[t]["concurrency"][key])
            for t in TARGETS
            if key in phases[t].get("concurrency", {})  # a phase that failed has no figures
        }
        summary["concurrency"][key] = per
        if "ours" in per and "baseline" in per:
            ratios["concurrency"][key] = {
                name: ratio(per["ours"][name], per["baseline"][name])
                for name in (
                    "cpu_us_per_event",
                    "mem_kb_per_stream",
                    "mem_kb_per_open_stream",
                    "ttfe_p50_ms",
                    "ttfe_p99_ms",
                    "status_p50_ms",
                    "status_p99_ms",
                )
            }
        if "ours" in per and "nometrics" in per:
            ratios["metrics"][key] = metrics_cost(per)
    per = {t: figures(phases[t]["saturation"]) for t in TARGETS if "saturation" in phases[t]}
    summary["saturation"] = per
    if "ours" in per and "nometrics" in per:
        ratios["metrics"]["saturation"] = metrics_cost(per)
    if "ours" in per and "baseline" in per:
        ratios["saturation"] = {
            name: ratio(per["ours"][name], per["baseline"][name])
            for name in ("events_per_s", "cpu_us_per_event")
        }
    per = {}
    for t in TARGETS:
        during = phases[t].get("status_during")
        if during:
            per[t] = {
                "p50_ms": during["latency_during_ms"]["p50"],
                "p99_ms": during["latency_during_ms"]["p99"],
                "polls": during["polls_during_streams"],
                "open_streams_p50": during["open_streams_at_polls"]["p50"],
                "streams_completed": during["streams"]["completed"],
                "streams_errors": during["streams"]["errors"],
            }
    summary["status_during"] = per
    if "ours" in per and "baseline" in per:
        ratios["status_during"] = {
            name: ratio(per["ours"][name], per["baseline"][name]) for name in ("p50_ms", "p99_ms")
        }
    results["summary"], results["ratios"] = summary, ratios
    results["targets"] = targets(results)


def metrics_cost(per: dict) -> float | None:
    """CPU per event of ours with metrics over ours without them."""
    return ratio(per["ours"]["cpu_us_per_event"], per["nometrics"]["cpu_us_per_event"])


def targets(results: dict) -> list[dict]:
    """Check the figures against the targets of issue 6."""
    summary, ratios = results["summary"], results["ratios"]
    checks = []

    def check(name: str, value: object, ok: bool | None) -> None:
        checks.append({"target": name, "value": value, "pass": ok})

    biggest = str(max(results["settings"]["concurrency"]))
    ours = summary["concurrency"].get(biggest, {}).get("ours")
    if ours:
        check(
            f"{biggest} concurrent runs: all complete, zero errors, every event persisted",
            f"{ours['completed']}/{biggest} complete, {ours['errors']} errors, "
            f"persisted {'yes' if ours['persisted_ok'] else 'NO'}",
            ours["completed"] == int(biggest)
            and ours["errors"] == 0
            and bool(ours["persisted_ok"]),
        )
    for key, r in ratios["concurrency"].items():
        cpu, mem = r["cpu_us_per_event"], r["mem_kb_per_stream"]
        check(f"C={key}: CPU per event <= 2x baseline", cpu, None if cpu is None else cpu <= 2)
        check(f"C={key}: memory per stream <= 3x baseline", mem, None if mem is None else mem <= 3)
    during = summary["status_during"].get("ours")
    if during:
        n = results["settings"]["status_streams"]
        check(
            f"batch status (100 ids) during {n} streams: p50 < 5 ms",
            during["p50_ms"],
            None if during["p50_ms"] is None else during["p50_ms"] < 5,
        )
        check(
            f"batch status (100 ids) during {n} streams: p99 < 20 ms",
            during["p99_ms"],
            None if during["p99_ms"] is None else during["p99_ms"] < 20,
        )
    for key, cost in ratios.get("metrics", {}).items():
        where = key if key == "saturation" else f"C={key}"
        check(
            f"{where}: CPU per event with metrics <= 1.05x without (issue 18)",
            cost,
            None if cost is None else cost <= 1.05,
        )
    at_100 = summary["concurrency"].get("100", {}).get("ours")
    if at_100:
        p50 = at_100["ttfe_p50_ms"]
        check("START p50 < 10 ms at C=100", p50, None if p50 is None else p50 < 10)
    return checks


def number(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: dict) -> str:
    """Render the summary as a short plain-text table."""
    summary, ratios = results["summary"], results["ratios"]
    out = []
    paced = results["settings"]["paced"]
    header = (
        f"{'C':>5} {'target':<8} {'done':>9} {'err':>4} {'TTFE p50':>9} {'p99':>8} "
        f"{'CPU us/ev':>9} {'KB/strm':>8} {'peak':>5} {'KB/open':>7} {'stat p50':>8} "
        f"{'p99':>7} {'persist':>7}"
    )
    out += [
        f"Streams (paced: {paced['deltas']} deltas, {paced['delay']:g} s apart); times in ms",
        header,
    ]
    for key, per in summary["concurrency"].items():
        for target in TARGETS:
            f = per.get(target)
            if not f:
                continue
            out.append(
                f"{key:>5} {target:<8} {f['completed']:>4}/{key:<4} {f['errors']:>4} "
                f"{number(f['ttfe_p50_ms']):>9} {number(f['ttfe_p99_ms']):>8} "
                f"{number(f['cpu_us_per_event']):>9} {number(f['mem_kb_per_stream']):>8} "
                f"{f['peak_open']:>5} {number(f['mem_kb_per_open_stream']):>7} "
                f"{number(f['status_p50_ms'], 2):>8} "
                f"{number(f['status_p99_ms'], 2):>7} {number(f['persisted_ok']):>7}"
            )
        r = ratios["concurrency"].get(key)
        if r:
            out.append(
                f"{key:>5} {'ours/bl':<8} {'':>9} {'':>4} {number(r['ttfe_p50_ms'], 2):>9} "
                f"{number(r['ttfe_p99_ms'], 2):>8} {number(r['cpu_us_per_event'], 2):>9} "
                f"{number(r['mem_kb_per_stream'], 2):>8} {'':>5} "
                f"{number(r['mem_kb_per_open_stream'], 2):>7} "
                f"{number(r['status_p50_ms'], 2):>8} {number(r['status_p99_ms'], 2):>7}"
            )
        cost = ratios.get("metrics", {}).get(key)
        if cost is not None:
            out.append(f"{key:>5} {'ours/nom':<8} {'':>38} {number(cost, 3):>9}")
    sat = summary["saturation"]
    if sat:
        s = results["settings"]
        out += [
            "",
            f"Saturation ({s['saturation_streams']} streams x {s['fast']['deltas']} "
            "deltas, no pacing)",
        ]
        for target, f in sat.items():
            out.append(
                f"  {target:<8} {number(f['events_per_s'], 0):>8} events/s  "
                f"{number(f['cpu_us_per_event']):>6} us/event  {f['completed']} complete, "
                f"{f['errors']} errors"
                + (f", persisted {number(f['persisted_ok'])}" if target in OURS else "")
            )
        r = ratios["saturation"]
        if r:
            out.append(
                f"  ours/bl  {number(r['events_per_s'], 2):>8} (events/s)  "
                f"{number(r['cpu_us_per_event'], 2):>6} (us/event)"
            )
        cost = ratios.get("metrics", {}).get("saturation")
        if cost is not None:
            out.append(f"  ours/nom {'':>8}             {number(cost, 3):>6} (us/event)")
    during = summary["status_during"]
    if during:
        out += [
            "",
            f"Batch status (100 ids) while {results['settings']['status_streams']} "
            "paced streams run",
        ]
        for target, f in during.items():
            out.append(
                f"  {target:<8} p50 {number(f['p50_ms'], 2):>7} ms  p99 {number(f['p99_ms'], 2):>7}"
                f" ms  ({f['polls']} polls, median {number(f['open_streams_p50'], 0)} streams "
                f"open; streams {f['streams_completed']} complete, {f['streams_errors']} errors)"
            )
    out += ["", "Targets (issue 6; metrics: issue 18)"]
    for c in results["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[c["pass"]]
        value = c["value"] if isinstance(c["value"], str) else number(c["value"], 2)
        out.append(f"  {mark}  {c['target']}: {value}")
    return "\n".join(out)


def errors_report(results: dict) -> str:
    lines = []
    for target, phases in results["phases"].items():
        for name, phase in sorted(_all_phases(phases)):
            kinds = phase.get("error_kinds") or {}
            for message, count in kinds.items():
                lines.append(f"  {target} {name}: {count} x {message}")
    return "\n".join(lines)


def profiles_report(results: dict, top: int = 12) -> str:
    """Where ours spent its CPU in its largest stream phase, if it was profiled."""
    phases = results["phases"].get("ours", {}).get("concurrency", {})
    profiled = [(int(c), p["profile"]) for c, p in phases.items() if p.get("profile")]
    if not profiled:
        return ""
    c, profile = max(profiled, key=lambda item: item[0])
    lines = [f"Where ours spends CPU at C={c} (py-spy, {profile['samples']} samples, % of them)"]
    lines.append("  self:")
    lines += [f"    {share:5.1f}%  {frame}" for frame, share in profile["self"][:top]]
    lines.append("  including callees (application and peewee frames):")
    lines += [f"    {share:5.1f}%  {frame}" for frame, share in profile["inclusive_app"][:top]]
    return "\n".join(lines)


def _all_phases(phases: dict):
    for key, phase in phases.get("concurrency", {}).items():
        yield f"C={key}", phase
        if phase.get("status"):
            yield f"C={key} status", phase["status"]
    if phases.get("saturation"):
        yield "saturation", phases["saturation"]
    if phases.get("status_during"):
        yield "during streams", phases["status_during"]["streams"]
        yield "during status", phases["status_during"]["status"]
    for name, failure in phases.get("failures", {}).items():
        yield name, {"error_kinds": {failure: 1}}


# Main ----------------------------------------------------------------------------------------


def machine() -> dict:
    versions = {}
    for package in ("flask", "gunicorn", "gevent", "greenlet", "peewee", "werkzeug"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", help="comma-separated C values (default 100,1000,5000)")
    parser.add_argument("--quick", action="store_true", help="C = 20,100 and fewer polls")
    parser.add_argument("--out", help="results file (default bench/results/<time>.json)")
    parser.add_argument(
        "--targets",
        default="ours,baseline",
        help="comma-separated: ours, baseline, floor (the baseline without Flask), nometrics "
        "(ours with AGENT_RUNS_METRICS=false)",
    )
    parser.add_argument("--status-polls", type=int, help="status polls after each phase")
    parser.add_argument(
        "--status-streams", type=int, help="streams running while polling (0: skip that phase)"
    )
    parser.add_argument(
        "--saturation-streams", type=int, default=50, help="0: skip the saturation phase"
    )
    parser.add_argument("--saturation-deltas", type=int)
    parser.add_argument(
        "--model",
        choices=("scripted", "openai", "anthropic"),
        default="scripted",
        help="ours runs on the in-process scripted model (default), or on bench/fake_model.py "
        "over HTTP through the OpenAI or Anthropic provider",
    )
    parser.add_argument("--deltas", type=int, default=50, help="content deltas per paced run")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between deltas")
    parser.add_argument(
        "--budget-us-per-event",
        type=float,
        default=800,
        help="phase deadline = 60 s + C x events x this (server time per event, µs)",
    )
    parser.add_argument("--max-phase-seconds", type=float, default=420)
    parser.add_argument("--keep", action="store_true", help="keep the servers' folders")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record every stream phase's worker with py-spy (skews the figures a little)",
    )
    options = parser.parse_args(argv)
    quick = options.quick
    options.concurrency = [
        int(c) for c in (options.concurrency or ("20,100" if quick else "100,1000,5000")).split(",")
    ]
    options.targets = [t.strip() for t in options.targets.split(",") if t.strip()]
    if set(options.targets) - set(TARGETS):
        parser.error(f"--targets takes {', '.join(TARGETS)}")
    options.status_polls = options.status_polls or (50 if quick else 200)
    options.status_polls_during = options.status_polls
    if options.status_streams is None:
        options.status_streams = 200 if quick else 1000
    if options.status_streams < 0 or options.saturation_streams < 0:
        parser.error("--status-streams and --saturation-streams take 0 or more")
    options.saturation_deltas = options.saturation_deltas or (500 if quick else 2000)
    options.paced = Shape("bench", options.deltas, options.delay, 200)
    # Messages long enough that every delta carries ~4 characters, as the paced ones do.
    options.fast = Shape(
        "bench_fast", options.saturation_deltas, 0.0, 4 * options.saturation_deltas
    )
    return options


def phases(options: argparse.Namespace, root: Path):
    """Yield (name, target, folder, run) for every phase, ours and baseline side by side."""
    for c in options.concurrency:
        for target in options.targets:
            folder = root / f"{target}-c{c}"
            yield f"C={c}", target, folder, partial(concurrency_phase, target, c, folder, options)
    for target in options.targets if options.saturation_streams else ():
        folder = root / f"{target}-saturation"
        yield "saturation", target, folder, partial(saturation_phase, target, folder, options)
    for target in options.targets if options.status_streams else ():
        folder = root / f"{target}-during"
        yield "status_during", target, folder, partial(status_during_phase, target, folder, options)


def count_errors(result: object) -> int:
    """Sum every "errors" count in a phase's result, however deep."""
    if isinstance(result, dict):
        return sum(
            value if key == "errors" and isinstance(value, int) else count_errors(value)
            for key, value in result.items()
        )
    return 0


def server_log_tail(folder: Path, lines: int = 30) -> str:
    """Return the end of a phase's server log (a traceback explains a 500)."""
    try:
        return "\n".join(
            (folder / "gunicorn.log").read_text(errors="replace").splitlines()[-lines:]
        )
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # The servers inherit it: a worker holding 5,000 streams needs more than 1,024 files.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(
        options.out or BENCH / "results" / f"{'quick-' if options.quick else ''}{stamp}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    options.profile_dir = None
    if options.profile:
        if not shutil.which("py-spy"):
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        options.profile_dir = out.with_name(out.stem + "-profiles")
        options.profile_dir.mkdir(exist_ok=True)
    results: dict = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(),
        "settings": {
            "concurrency": options.concurrency,
            "quick": options.quick,
            "gunicorn": GUNICORN_SETTINGS,
            "ours_environment": OURS_LIMITS_OFF,
            "model": options.model,
            "paced": vars_of(options.paced),
            "fast": vars_of(options.fast),
            "saturation_streams": options.saturation_streams,
            "status_polls": options.status_polls,
            "status_streams": options.status_streams,
        },
        "phases": {t: {"concurrency": {}, "failures": {}} for t in options.targets},
    }
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="agent-runs-bench-"))
    try:
        for name, target, folder, run_phase in phases(options, root):
            try:
                where, key = results["phases"][target], name
                if name.startswith("C="):
                    where, key = where["concurrency"], name[2:]
                where[key] = result = run_phase()
                if count_errors(result):
                    result["server_log_tail"] = server_log_tail(folder)
            except (
                RuntimeError,
                OSError,
                ValueError,
                KeyError,
                subprocess.SubprocessError,
            ) as error:
                log(f"{target} {name} failed: {error}")
                results["phases"][target]["failures"][name] = f"{type(error).__name__}: {error}"
                results["phases"][target].setdefault("failure_logs", {})[name] = server_log_tail(
                    folder
                )
    finally:
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log(f"servers' folders kept in {root}")
    results["duration_s"] = time.monotonic() - started
    try:
        summarise(results)
    except (KeyError, TypeError) as error:
        log(f"could not summarise every phase: {error!r}")
        results.setdefault("summary", {})
    out.write_text(json.dumps(results, indent=2))
    if "targets" in results:
        print(table(results))
    profiles = profiles_report(results)
    if profiles:
        print("\n" + profiles)
    errors = errors_report(results)
    if errors:
        print("\nErrors\n" + errors)
    print(f"\nResults: {out} ({results['duration_s']:.0f} s)")
    return 0


def vars_of(shape: Shape) -> dict:
    return {
        "agent": shape.agent,
        "deltas": shape.deltas,
        "delay": shape.delay,
        "message_length": shape.message_length,
        "events_per_stream": shape.events,
    }


if __name__ == "__main__":
    sys.exit(main())
