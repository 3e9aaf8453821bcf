"""What agent_runs.client costs per event, against raw readers of the same stream, in one run.

    python bench/client_overhead.py                  # 2,000-event runs, 15 rounds (~1 minute)
    python bench/client_overhead.py --events 500 --rounds 5

A gunicorn (one gevent worker, SQLite in a temporary folder, 127.0.0.1 port 0) serves a
``scripted`` agent that answers in ``--events`` content deltas with no pacing. In this process,
each reader then reads the same streams, in turns, round after round:

- ``raw_lines``: httpx's ``iter_lines()``, counting the ``data:`` lines: the floor.
- ``raw_json``: the same, plus ``json.loads`` of each ``data:`` line: a minimal useful reader.
- ``httpx_sse``: httpx-sse's ``iter_sse()``, frames parsed but not decoded.
- ``client``: ``AgentRunsClient.events()`` / ``.stream()``: typed events, ids tracked for
  resuming.

Two workloads: ``replay`` reads the ``/events`` of one finished run (the same bytes every
time, sent as fast as the server reads its log) and ``live`` starts a new run per read with
``POST /runs/stream``. The figure is the reader's CPU time (``time.process_time``, this
process only; the server is another process) per event, median over the rounds; the
overhead is the client's minus ``raw_lines``'s. Results go to stdout as a table and to
``bench/results/client_overhead-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from httpx_sse import EventSource

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from agent_runs.client import AgentRunsClient  # noqa: E402
from tests.server import GunicornServer  # noqa: E402

AGENTS = """\
agents:
  - id: bench
    description: Answers in {events} content deltas, as fast as it can.
    model: scripted
    model_options: {{content_deltas: {events}}}
"""


def read_raw_lines(response: httpx.Response) -> int:
    return sum(1 for line in response.iter_lines() if line.startswith("data:"))


def read_raw_json(response: httpx.Response) -> int:
    count = 0
    for line in response.iter_lines():
        if line.startswith("data:"):
            json.loads(line[5:])
            count += 1
    return count


def read_httpx_sse(response: httpx.Response) -> int:
    return sum(1 for frame in EventSource(response).iter_sse() if frame.data)


RAW_READERS: dict[str, Callable[[httpx.Response], int]] = {
    "raw_lines": read_raw_lines,
    "raw_json": read_raw_json,
    "httpx_sse": read_httpx_sse,
}
READERS = (*RAW_READERS, "client")


def measure(read: Callable[[], int]) -> tuple[float, float, int]:
    """Return (CPU seconds, wall seconds, events) of one read."""
    cpu, wall = time.process_time(), time.perf_counter()
    events = read()
    return time.process_time() - cpu, time.perf_counter() - wall, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="content deltas per run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="client-bench-"))
    agents_file = folder / "agents.yaml"
    agents_file.write_text(AGENTS.format(events=args.events), encoding="utf-8")
    # Each delta carries a few characters of the echoed message.
    message = "token " * args.events
    env = {
        "AGENT_RUNS_AGENTS_FILE": str(agents_file),
        "AGENT_RUNS_RATE_LIMIT": "0",
    }
    samples: dict[str, dict[str, list[tuple[float, float, int]]]] = {
        workload: {reader: [] for reader in READERS} for workload in ("replay", "live")
    }
    with GunicornServer(folder, env=env) as server:
        base = f"{server.url}/api/agents/bench/runs"
        headers = {**server.headers, "Accept": "text/event-stream"}
        with httpx.Client(timeout=60) as http, AgentRunsClient(server.url, server.token) as client:
            finished = client.run("bench", message)
            run_id = finished["runId"]

            def raw(reader: str, workload: str) -> Callable[[], int]:
                def read() -> int:
                    if workload == "replay":
                        request = http.build_request(
                            "GET", f"{base}/{run_id}/events", headers=headers
                        )
                    else:
                        request = http.build_request(
                            "POST", f"{base}/stream", headers=headers, json={"message": message}
                        )
                    response = http.send(request, stream=True)
                    try:
                        return RAW_READERS[reader](response)
                    finally:
                        response.close()

                return read

            def typed(workload: str) -> Callable[[], int]:
                def read() -> int:
                    if workload == "replay":
                        stream = client.events("bench", run_id)
                    else:
                        stream = client.stream("bench", message)
                    return sum(1 for _ in stream)

                return read

            for workload in ("replay", "live"):
                # A round untimed first: connections opened, code paths warm.
                for reader in READERS:
                    (typed(workload) if reader == "client" else raw(reader, workload))()
                for round_index in range(args.rounds):
                    # The order turns each round, so no reader always follows the same one.
                    order = READERS[round_index % 4 :] + READERS[: round_index % 4]
                    for reader in order:
                        read = typed(workload) if reader == "client" else raw(reader, workload)
                        samples[workload][reader].append(measure(read))

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "events_per_run": samples["replay"]["client"][0][2],
        "rounds": args.rounds,
        "workloads": {},
    }
    print(f"{results['events_per_run']} events per run, {args.rounds} rounds, {results['machine']}")
    print(
        f"{'workload':<8} {'reader':<10} {'CPU µs/event':>13} {'wall µs/event':>14} {'overhead':>9}"
    )
    for workload, readers in samples.items():
        floor = None
        results["workloads"][workload] = {}
        for reader, runs in readers.items():
            counts = {events for _, _, events in runs}
            assert len(counts) == 1, f"{reader} read {counts} events"
            events = counts.pop()
            cpu = statistics.median(cpu / events for cpu, _, _ in runs) * 1e6
            wall = statistics.median(wall / events for _, wall, _ in runs) * 1e6
            floor = cpu if floor is None else floor
            results["workloads"][workload][reader] = {
                "cpu_us_per_event": round(cpu, 2),
                "wall_us_per_event": round(wall, 2),
                "cpu_us_per_event_all": [round(c / e * 1e6, 2) for c, _, e in runs],
            }
            print(
                f"{workload:<8} {reader:<10} {cpu:>13.2f} {wall:>14.2f} "
                f"{'+' + format(cpu - floor, '.2f') if reader != 'raw_lines' else '':>9}"
            )
    out = args.out or BENCH / "results" / f"client_overhead-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
