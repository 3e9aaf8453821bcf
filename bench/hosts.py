"""Benchmark many workers and two hosts: SQLite against PostgreSQL, in the same run.

    python bench/hosts.py                      # every layout below (about 4 minutes on 2 cores)
    python bench/hosts.py --quick              # fewer and shorter streams
    python bench/hosts.py --layouts pg-1,pg-2x2 --out bench/results/hosts.json

A layout is a database and the masters serving it: ``sqlite-N`` and ``pg-N`` are one gunicorn
master with N gevent workers; ``pg-2x2`` is two masters ("hosts", on two ports) of two
workers each, sharing one PostgreSQL database. For each layout a fresh server (and database)
starts, and the load client (bench/load.py, its own process) measures:

- saturation: S unpaced streams at once (the fast agent, no delay between deltas): events per
  second the server delivers when the CPU, not the model, is the limit;
- held: C paced streams at once (50 deltas, 20 ms apart): how many complete, gap-free;
- connections: the most database connections open during the phases (PostgreSQL only);
- with two masters, cross-host delivery: R runs stream on master A while a follower of each
  reads /events on master B; for every event, the time from its timestamp (stamped as the run
  made it, on this machine's clock) to its arrival on B, beside the same on A, in-memory, as
  the baseline.

PostgreSQL is a throwaway cluster of the OS package (tests/pg.py), or ``--postgres-url``.
Results go to a JSON file and a table on stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
from run import (
    GUNICORN_CONF,
    GUNICORN_SETTINGS,
    LISTENING,
    OURS_LIMITS_OFF,
    LoadProcess,
    Shape,
    agents_file,
    cpu_seconds,
    log,
    stream_args,
)
from stats import percentiles

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from tests.pg import PostgresCluster  # noqa: E402

LAYOUTS = ("sqlite-1", "sqlite-2", "sqlite-4", "pg-1", "pg-2", "pg-4", "pg-2x2")


class Master:
    """One gunicorn master ("host") with ``workers`` gevent workers on a free loopback port."""

    def __init__(self, folder: Path, workers: int, env: dict[str, str], shapes: tuple) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p
            ),
            "AGENT_RUNS_ACCESS_LOG": "",
            "AGENT_RUNS_SHUTDOWN_TIMEOUT": "5",
            **OURS_LIMITS_OFF,
            **env,
        }
        self.env["AGENT_RUNS_AGENTS_FILE"] = str(agents_file(folder, *shapes))
        self.log_path = folder / "gunicorn.log"
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.token = ""

    def stream_path(self, shape: Shape) -> str:
        return f"/api/agents/{shape.agent}/runs/stream"

    @property
    def pids(self) -> list[int]:
        if self.process is None:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [self.process.pid, *map(int, children.read_text().split())]
        except OSError:
            return [self.process.pid]

    def __enter__(self) -> Master:
        created = subprocess.run(
            [sys.executable, "-m", "agent_runs", "tokens", "create", "--org", "bench"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=self.folder,
        )
        self.token = created.stdout.strip().splitlines()[-1]
        argv = [sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONF)]
        settings = {**GUNICORN_SETTINGS, "workers": self.workers}
        for name, value in settings.items():
            flag = "--keep-alive" if name == "keepalive" else "--" + name.replace("_", "-")
            argv += [flag, str(value)]
        argv += ["--no-control-socket", "--bind", "127.0.0.1:0", "agent_runs:create_app()"]
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.folder,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_serving()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_serving(self, timeout: float = 60) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match and len(self.pids) == 1 + self.workers:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                try:
                    with urllib.request.urlopen(self.url + "/api/agents", timeout=2):
                        return
                except urllib.error.HTTPError as answer:
                    answer.close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"the server did not start:\n{self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc_info: object) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=GUNICORN_SETTINGS["graceful_timeout"] + 5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class ConnectionSampler:
    """Samples the database's open connections (pg_stat_activity) in a thread; keeps the peak."""

    def __init__(self, url: str | None, interval: float = 0.2) -> None:
        self.url, self.interval, self.peak = url, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as connection:
            while not self._stop.wait(self.interval):
                (count,) = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
                self.peak = max(self.peak, count)

    def __enter__(self) -> ConnectionSampler:
        if self.url:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self.url:
            self._thread.join()


def load_phase(masters: list[Master], shape: Shape, streams: int, name: str) -> dict:
    """``streams`` streams of ``shape``, split evenly over the masters, all at once."""
    before = sum(cpu_seconds(m.pids) for m in masters)
    loads = [
        LoadProcess(
            master.folder,
            f"{name}-{index}",
            stream_args(master, shape, streams // len(masters)),
            deadline=180,
        )
        for index, master in enumerate(masters)
    ]
    try:
        results = [load.result() for load in loads]
    finally:
        for load in loads:
            load.kill()
    cpu = sum(cpu_seconds(m.pids) for m in masters) - before
    start = min(r["t0_wall"] for r in results)
    end = max(r["t0_wall"] + r["duration_s"] for r in results)
    events = sum(r["events"] for r in results)
    return {
        "streams": sum(r["concurrency"] for r in results),
        "completed": sum(r["completed"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_kinds": [r["error_kinds"] for r in results if r["errors"]],
        "events": events,
        "duration_s": end - start,
        "events_per_s": events / (end - start) if end > start else None,
        "server_cpu_s": cpu,
        "cpu_us_per_event": cpu / events * 1e6 if events else None,
        "ttfe_ms_p50": [r["ttfe_ms"]["p50"] for r in results],
        "peak_open": sum(r["peak_open"] for r in results),
    }


class SseReader(threading.Thread):
    """Reads one SSE response in a thread; records each event's arrival time (time.time())."""

    def __init__(self, master: Master, method: str, path: str, body: dict | None = None):
        super().__init__(daemon=True)
        self.master, self.method, self.path, self.body = master, method, path, body
        self.events: list[tuple[int, str, int, float]] = []  # id, type, timestamp, arrival
        self.run_id = ""
        self.started = threading.Event()

    def run(self) -> None:
        host = self.master.url.removeprefix("http://")
        connection = http.client.HTTPConnection(host, timeout=60)
        headers = {"Authorization": f"Bearer {self.master.token}"}
        payload = None
        if self.body is not None:
            payload = json.dumps(self.body)
            headers["Content-Type"] = "application/json"
        connection.request(self.method, self.path, payload, headers)
        response = connection.getresponse()
        buffer = b""
        while chunk := response.read1(65536):
            now = time.time()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                lines = dict(
                    line.split(": ", 1) for line in frame.decode().split("\n") if ": " in line
                )
                if "data" not in lines:
                    continue
                data = json.loads(lines["data"])
                self.events.append((int(lines["id"]), data["event"], data["timestamp"], now))
                if data["event"] == "START":
                    self.run_id = json.loads(data["data"])["runId"]
                self.started.set()
                if data["event"] in ("STOP", "ERROR"):
                    connection.close()
                    return
        connection.close()


def delivery_phase(a: Master, b: Master, runs: int, shape: Shape) -> dict:
    """Runs stream on A, each followed on B; milliseconds from event timestamp to arrival."""
    origins, followers = [], []
    for index in range(runs):
        origin = SseReader(
            a, "POST", a.stream_path(shape), {"message": f"delivery {index:03d} " + "x" * 40}
        )
        origin.start()
        origins.append(origin)
    for origin in origins:
        origin.started.wait(30)
        follower = SseReader(b, "GET", f"/api/agents/{shape.agent}/runs/{origin.run_id}/events")
        follower.start()
        followers.append(follower)
    for reader in origins + followers:
        reader.join(60)
    # Only events that were live on B: after its follower's first read (the replay of what had
    # happened before it connected is not delivery).
    on_a, on_b = [], []
    for origin, follower in zip(origins, followers, strict=True):
        replayed = follower.events[0][3] if follower.events else 0
        on_a += [(arrival - ts / 1000) * 1000 for _, _, ts, arrival in origin.events]
        on_b += [
            (arrival - ts / 1000) * 1000
            for _, _, ts, arrival in follower.events
            if arrival > replayed + 0.001
        ]
        assert [e[0] for e in follower.events] == [e[0] for e in origin.events]
    return {"runs": runs, "same_host_ms": percentiles(on_a), "cross_host_ms": percentiles(on_b)}


def run_layout(layout: str, folder: Path, cluster: PostgresCluster | None, options) -> dict:
    kind, _, shape_of = layout.partition("-")
    masters_count, _, workers = shape_of.rpartition("x")
    masters_count = int(masters_count or 1)
    workers = int(workers)
    url = cluster.new_database() if kind == "pg" else f"sqlite:///{folder / 'bench.sqlite3'}"
    env = {"AGENT_RUNS_DATABASE_URL": url}
    shapes = (options.paced, options.fast)
    masters = [
        Master(folder / f"master{index}", workers, env, shapes) for index in range(masters_count)
    ]
    with ConnectionSampler(url if kind == "pg" else None) as connections:
        for master in masters:
            master.__enter__()
        try:
            log(f"{layout}: warm-up")
            load_phase(masters, options.paced, 10 * masters_count, "warmup")
            log(f"{layout}: saturation, {options.saturation} streams")
            saturation = load_phase(masters, options.fast, options.saturation, "saturation")
            log(f"{layout}: {options.held} paced streams")
            held = load_phase(masters, options.paced, options.held, "held")
            result = {"layout": layout, "saturation": saturation, "held": held}
            if masters_count == 2:
                log(f"{layout}: cross-host delivery, {options.delivery_runs} runs")
                result["delivery"] = delivery_phase(*masters, options.delivery_runs, options.paced)
        finally:
            for master in masters:
                master.__exit__()
    result["db_connections_peak"] = connections.peak if kind == "pg" else None
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| layout | events/s at saturation | CPU µs/event | paced streams held | "
        "errors | DB connections (peak) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s, h = r["saturation"], r["held"]
        lines.append(
            f"| {r['layout']} | {s['events_per_s']:,.0f} | {s['cpu_us_per_event']:.0f} | "
            f"{h['completed']} / {h['streams']} | {s['errors'] + h['errors']} | "
            f"{r['db_connections_peak'] if r['db_connections_peak'] is not None else '-'} |"
        )
    for r in results:
        if "delivery" in r:
            d = r["delivery"]
            lines.append(
                f"\n{r['layout']}: delivery over {d['runs']} runs, event timestamp to arrival: "
                f"same host (in memory) p50 {d['same_host_ms']['p50']:.1f} ms, "
                f"p99 {d['same_host_ms']['p99']:.1f} ms; cross host (NOTIFY) p50 "
                f"{d['cross_host_ms']['p50']:.1f} ms, p99 {d['cross_host_ms']['p99']:.1f} ms "
                f"({d['cross_host_ms']['n']} events)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--postgres-url", help="an admin URL instead of a throwaway cluster")
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    options.saturation = 40 if options.quick else 200
    options.held = 200 if options.quick else 1000
    options.delivery_runs = 10 if options.quick else 30
    options.paced = Shape("bench", 50, 0.02, 200)
    options.fast = Shape("bench_fast", 200 if options.quick else 1000, 0.0, 200)
    layouts = options.layouts.split(",")
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown layouts: {sorted(unknown)}; choose from {', '.join(LAYOUTS)}")

    root = Path(tempfile.mkdtemp(prefix="agent-runs-hosts-"))
    results = []
    with PostgresCluster(options.postgres_url) as cluster:
        for layout in layouts:
            results.append(run_layout(layout, root / layout, cluster, options))
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
        "results": results,
    }
    out = Path(options.out or BENCH / "results" / f"hosts-{int(time.time())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
