"""Benchmark a tool call through MCP against the same tool in Python, on this machine.

    python bench/mcp_bench.py                 # about a minute on 2 cores
    python bench/mcp_bench.py --calls 100 --runs 40 --out bench/results/mcp.json

Two parts, each against a baseline measured in the same run:

1. The client alone, in this process (gevent-patched, as a worker is): ``--calls`` calls one
   after another of ``lookup_order`` on the SDK-built MCP server of tests/mcp_server.py, over
   streamable HTTP (answers as SSE, and as JSON) and over stdio, through the project's client
   (``agent_runs.runtime.mcp``); and the Python function itself. Latency per call, and CPU
   per call in this process and in the MCP server's.
2. Whole runs through a real gunicorn (1 gevent worker, SQLite): ``--runs`` synchronous runs
   one after another of an agent whose one tool call is the Python function, and of one whose
   call goes to the MCP server; then the same ``--concurrency`` at a time. The difference per
   run is the overhead of a call through MCP: latency, and the worker's CPU.

Results go to a JSON file (``bench/results/mcp-<timestamp>.json`` unless ``--out``) and a
table on stdout. See bench/README.md.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent.pool  # noqa: E402
import requests  # noqa: E402
from bench_tools import lookup_order  # noqa: E402
from run import (  # noqa: E402
    GUNICORN_CONF,
    GUNICORN_SETTINGS,
    LISTENING,
    bench_token,
    cpu_seconds,
    log,
)
from stats import percentiles  # noqa: E402

from agent_runs.runtime.agents import mcp_server  # noqa: E402
from agent_runs.runtime.mcp import McpClients, McpSettings  # noqa: E402

BENCH = Path(__file__).resolve().parent
MCP_SERVER = BENCH.parent / "tests" / "mcp_server.py"


class McpServerProcess:
    """The SDK-built MCP server on a free loopback port, for as long as the block lasts."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> McpServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, str(MCP_SERVER), *self.options], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.__exit__()
            raise RuntimeError(f"the MCP server did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def summary(seconds: list[float], cpu: float, server_cpu: float | None = None) -> dict:
    """Latency percentiles in µs, and CPU per call in µs (this process, and the server's)."""
    calls = len(seconds)
    ranks = percentiles(seconds)
    figures = {f"{k}_us": ranks[k] * 1e6 for k in ("p50", "p99")}  # type: ignore[operator]
    figures.update(calls=calls, cpu_us_per_call=cpu / calls * 1e6)
    if server_cpu is not None:
        figures["server_cpu_us_per_call"] = server_cpu / calls * 1e6
    return figures


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_calls(call, calls: int, server_pid: int | None) -> dict:
    """Make ``calls`` calls one after another (after a few to warm up); time each."""
    for _ in range(5):
        call()
    seconds = []
    cpu, server = own_cpu(), cpu_seconds([server_pid]) if server_pid else 0.0
    for _ in range(calls):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    server_cpu = cpu_seconds([server_pid]) - server if server_pid else None
    return summary(seconds, own_cpu() - cpu, server_cpu)


def client_phase(calls: int) -> dict:
    """The round trip of one tool call through each client, and of the Python function."""
    results = {"python": timed_calls(lambda: lookup_order("A-1"), calls, None)}
    clients = McpClients(McpSettings())
    try:
        for label, options in (("mcp_http_sse", ()), ("mcp_http_json", ("--json",))):
            with McpServerProcess(*options) as server:
                assert server.process is not None
                definition = mcp_server({"name": "crm", "url": server.url})

                def call(definition=definition) -> None:
                    result, error = clients.call(
                        definition, {}, "lookup_order", {"order_id": "A-1"}, 10
                    )
                    assert result == "Order A-1: shipped", (result, error)

                results[label] = timed_calls(call, calls, server.process.pid)
                log(f"client {label}: {results[label]['p50_us']:.0f} µs p50")
        stdio = mcp_server(
            {"name": "files", "command": sys.executable, "args": [str(MCP_SERVER), "--stdio"]}
        )

        def stdio_call() -> None:
            result, error = clients.call(stdio, {}, "lookup_order", {"order_id": "A-1"}, 20)
            assert result == "Order A-1: shipped", (result, error)

        stdio_call()  # starts the process
        process = clients.connection(stdio, {}).process  # type: ignore[attr-defined]
        results["mcp_stdio"] = timed_calls(stdio_call, calls, process.pid)
        log(f"client mcp_stdio: {results['mcp_stdio']['p50_us']:.0f} µs p50")
    finally:
        clients.close()
    return results


AGENTS = """\
agents:
  - id: python_tool
    name: A Python tool
    tools: [bench_tools:lookup_order]
  - id: mcp_tool
    name: The same tool through MCP
    mcp_servers:
      - {{name: crm, url: "{url}", tools: [lookup_order]}}
"""


class Gunicorn:
    """The server under gunicorn with the benchmark's settings, one gevent worker."""

    def __init__(self, folder: Path, agents: Path) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "PYTHONPATH": str(BENCH),
            "AGENT_RUNS_DATABASE_URL": f"sqlite:///{folder / 'bench.sqlite3'}",
            "AGENT_RUNS_AGENTS_FILE": str(agents),
            "AGENT_RUNS_ACCESS_LOG": "",
            "AGENT_RUNS_RATE_LIMIT": "0",
            "AGENT_RUNS_MAX_ACTIVE_RUNS_PER_ORG": "0",
            "AGENT_RUNS_DEFAULT_MODEL": "scripted",
        }
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.worker_pid = 0
        self.headers: dict[str, str] = {}

    def __enter__(self) -> Gunicorn:
        self.headers = {"Authorization": f"Bearer {bench_token(self.env, self.folder)}"}
        argv = [sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONF)]
        for name in ("worker_class", "workers", "worker_connections", "timeout"):
            argv += ["--" + name.replace("_", "-"), str(GUNICORN_SETTINGS[name])]
        argv += ["--bind", "127.0.0.1:0", "agent_runs:create_app()"]
        log_path = self.folder / "gunicorn.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                argv, env=self.env, cwd=self.folder, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.worker_pid:
            match = LISTENING.search(log_path.read_text(errors="replace"))
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            if match and children.read_text().split():
                self.url = f"http://127.0.0.1:{match.group(1)}"
                self.worker_pid = int(children.read_text().split()[0])
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/api/agents", headers=self.headers, timeout=2)
                return self
            except requests.RequestException:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(log_path.read_text(errors="replace"))

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def run(self, agent: str, index: int) -> None:
        response = requests.post(
            f"{self.url}/api/agents/{agent}/runs",
            json={"message": f"B-{index}"},
            headers=self.headers,
            timeout=30,
        )
        body = response.json()
        assert body["status"] == "COMPLETED", body
        assert body["tools"][0]["result"] == f"Order B-{index}: shipped", body["tools"]


def runs_phase(runs: int, concurrency: int) -> dict:
    """Whole runs with a Python tool and with the same tool through MCP, in one server."""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-mcp-") as folder, McpServerProcess() as crm:
        assert crm.process is not None
        agents = Path(folder) / "agents.yaml"
        agents.write_text(AGENTS.format(url=crm.url))
        with Gunicorn(Path(folder), agents) as server:
            for agent in ("python_tool", "mcp_tool"):
                for index in range(5):  # warm up: sessions, the tool list, the pool
                    server.run(agent, index)
                seconds, worker, mcp = (
                    [],
                    cpu_seconds([server.worker_pid]),
                    cpu_seconds([crm.process.pid]),
                )
                for index in range(runs):
                    started = time.perf_counter()
                    server.run(agent, index)
                    seconds.append(time.perf_counter() - started)
                figures = summary(seconds, cpu_seconds([server.worker_pid]) - worker)
                figures["mcp_server_cpu_us_per_run"] = (
                    (cpu_seconds([crm.process.pid]) - mcp) / runs * 1e6
                )
                results[f"{agent}_sequential"] = figures

                pool = gevent.pool.Pool(concurrency)
                total = runs * 4
                worker = cpu_seconds([server.worker_pid])
                started = time.perf_counter()
                list(pool.imap_unordered(lambda i, a=agent: server.run(a, i), range(total)))
                elapsed = time.perf_counter() - started
                results[f"{agent}_concurrent"] = {
                    "runs": total,
                    "concurrency": concurrency,
                    "runs_per_second": total / elapsed,
                    "worker_cpu_us_per_run": (cpu_seconds([server.worker_pid]) - worker)
                    / total
                    * 1e6,
                }
                log(f"runs {agent}: {figures['p50_us'] / 1000:.1f} ms p50")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per client")
    parser.add_argument("--runs", type=int, default=100, help="runs per agent, one at a time")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    started = time.monotonic()
    results = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": next(
                (
                    line.split(":", 1)[1].strip()
                    for line in open("/proc/cpuinfo")
                    if line.startswith("model name")
                ),
                platform.processor(),
            ),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "options": vars(options) | {"out": str(options.out)},
        "client": client_phase(options.calls),
        "runs": runs_phase(options.runs, options.concurrency),
    }
    results["seconds"] = time.monotonic() - started
    out = options.out or BENCH / "results" / f"mcp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    log(f"wrote {out}")


def print_table(results: dict) -> None:
    client, runs = results["client"], results["runs"]
    print("\nOne tool call, the client alone (µs)")
    print(f"{'':24}{'p50':>10}{'p99':>10}{'cpu/call':>10}{'server cpu':>12}")
    for name, row in client.items():
        server = row.get("server_cpu_us_per_call")
        print(
            f"{name:24}{row['p50_us']:>10.0f}{row['p99_us']:>10.0f}{row['cpu_us_per_call']:>10.0f}"
            f"{'' if server is None else f'{server:.0f}':>12}"
        )
    print("\nWhole runs through gunicorn (one tool call each)")
    for agent in ("python_tool", "mcp_tool"):
        one, many = runs[f"{agent}_sequential"], runs[f"{agent}_concurrent"]
        print(
            f"{agent:12} one at a time: p50 {one['p50_us'] / 1000:.2f} ms, p99 "
            f"{one['p99_us'] / 1000:.2f} ms, worker CPU {one['cpu_us_per_call']:.0f} µs/run; "
            f"{many['concurrency']} at a time: {many['runs_per_second']:.0f} runs/s, worker CPU "
            f"{many['worker_cpu_us_per_run']:.0f} µs/run"
        )
    py, mc = runs["python_tool_sequential"], runs["mcp_tool_sequential"]
    print(
        f"overhead of a call through MCP: {(mc['p50_us'] - py['p50_us']) / 1000:.2f} ms p50, "
        f"{mc['cpu_us_per_call'] - py['cpu_us_per_call']:.0f} µs of worker CPU"
    )


if __name__ == "__main__":
    main()
