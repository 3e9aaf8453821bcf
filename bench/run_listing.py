"""GET /runs latency with a million runs in the table, against a thousand, and batch status.

    python bench/run_listing.py                       # 1,000,000 and 1,000 runs (~3 minutes)
    python bench/run_listing.py --runs 200000 --requests 100

For each table size, a SQLite database in a temporary folder is migrated (``agent-runs
tokens create``) and filled with bulk SQL (one ``INSERT ... SELECT`` over a recursive series,
no Python per row): ``--runs`` runs over 90 days in ``--runs / 10`` sessions, 90% of them
organisation ``acme``'s (100 users, 5 agents), the rest ten other organisations'; 1% FAILED,
0.1% RUNNING. No ANALYZE: the planner works as on a database nobody tuned. Then one gunicorn
(one gevent worker, 127.0.0.1 port 0, rate limit off) serves it, and this process sends
``--requests`` requests of each kind one after another on one keep-alive connection, after
20 of warm-up, timing each from send to the end of its body:

- ``first page``: ``GET /runs?limit=20`` for the organisation;
- ``deep page``: the same from a cursor at a random run of the organisation (any page);
- ``user``, ``agentId``, ``status=FAILED``, ``status=RUNNING``, ``sessionId``, ``since``:
  first pages with one filter (``user`` with a token bound to one user);
- baseline ``batch status``: ``GET /agents/assistant/runs/status?runIds=`` 20 random ids,
  the seed's endpoint, which reads as many rows by primary key and answers the same shape.

Results go to stdout as a table and to ``bench/results/run_listing-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from tests.server import GunicornServer  # noqa: E402

AGENTS = ("assistant", "finance_agent", "clock_agent", "support", "triage")
DAYS = 90
WARMUP = 20

FILL = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :sessions - 1)
INSERT INTO session (id, uid, org_id, user_id, agent_id, created_at, updated_at)
SELECT i + 1, printf('sess_%08d', i),
       CASE WHEN i % 10 = 9 THEN 'org' || (i / 10 % 10) ELSE 'acme' END,
       'user' || (i % 100),
       CASE i % 5 WHEN 0 THEN 'assistant' WHEN 1 THEN 'finance_agent' WHEN 2 THEN 'clock_agent'
                  WHEN 3 THEN 'support' ELSE 'triage' END,
       :start, :start
FROM n;

WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :runs - 1),
t(i, us) AS (SELECT i, :start_us + i * :step_us FROM n)
INSERT INTO run (id, org_id, user_id, agent_id, session_id, status, model, input, request,
                 content, usage, cancel_requested, created_at, started_at, completed_at)
SELECT printf('run_%012x%020d', us / 1000, i),
       s.org_id, s.user_id, s.agent_id, s.id,
       CASE WHEN i % 1000 = 0 THEN 'RUNNING' WHEN i % 100 = 7 THEN 'FAILED'
            ELSE 'COMPLETED' END,
       'scripted', 'What is the current NVDA stock price?', '{}',
       'get_stock_price returned 140.61.',
       '{"input_tokens":12,"output_tokens":4,"reasoning_tokens":0,"model_calls":2}',
       0, stamp, stamp, stamp
FROM (SELECT i, us, strftime('%Y-%m-%d %H:%M:%S', us / 1000000, 'unixepoch')
                    || printf('.%06d', us % 1000000) AS stamp FROM t) AS r
JOIN session AS s ON s.id = r.i % :sessions + 1;
"""


def fill(path: Path, runs: int) -> float:
    """Fill the migrated database with ``runs`` runs; return the seconds it took."""
    started = time.monotonic()
    end = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    start_us = int((end - datetime.timedelta(days=DAYS)).timestamp() * 1_000_000)
    values = {
        "runs": runs,
        "sessions": max(runs // 10, 1),
        "start": "2026-09-02 00:00:00",
        "start_us": start_us,
        "step_us": DAYS * 86_400_000_000 // runs,
    }
    connection = sqlite3.connect(path)
    try:
        for statement in FILL.split(";\n\n"):
            connection.execute(statement, {k: v for k, v in values.items() if f":{k}" in statement})
        connection.commit()
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return time.monotonic() - started


def cursor_of(created_at: str, run_id: str) -> str:
    raw = json.dumps([created_at.replace(" ", "T"), run_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def samples(path: Path, count: int, seed: int) -> dict[str, list]:
    """Random runs and sessions of acme's, read before the server starts."""
    connection = sqlite3.connect(path)
    try:
        total = connection.execute("SELECT max(rowid) FROM run").fetchone()[0]
        rng = random.Random(seed)

        def rows(sql: str, k: int) -> list:
            found: list = []
            while len(found) < k:
                rowid = rng.randint(1, total)
                found += connection.execute(sql, (rowid,)).fetchall()
            return found[:k]

        positions = rows(
            "SELECT created_at, id FROM run WHERE rowid = ? AND org_id = 'acme'", count
        )
        sessions = rows(
            "SELECT s.uid FROM run JOIN session s ON s.id = run.session_id "
            "WHERE run.rowid = ? AND run.org_id = 'acme' AND s.user_id IS NOT NULL",
            count,
        )
        batches = [
            [
                r[0]
                for r in rows(
                    "SELECT id FROM run WHERE rowid = ? AND org_id = 'acme' "
                    "AND agent_id = 'assistant'",
                    20,
                )
            ]
            for _ in range(count)
        ]
    finally:
        connection.close()
    return {
        "cursors": [cursor_of(*position) for position in positions],
        "sessions": [s[0] for s in sessions],
        "batches": batches,
    }


def measure(client: httpx.Client, urls: list[str], headers: dict[str, str]) -> dict[str, float]:
    for url in urls[:WARMUP]:
        client.get(url, headers=headers).raise_for_status()
    times, items = [], 0
    for url in urls[WARMUP:]:
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        body = response.content
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        answer = json.loads(body)
        items += len(answer["items"] if isinstance(answer, dict) else answer)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
        "mean_ms": statistics.fmean(times),
        "items_per_answer": items / len(times),
    }


def bench_size(runs: int, requests: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        server = GunicornServer(Path(folder), env={"AGENT_RUNS_RATE_LIMIT": "0"})
        user_token = server.cli("tokens", "create", "--org", "acme", "--user", "user7")
        user_headers = {"Authorization": f"Bearer {user_token.stdout.strip().splitlines()[-1]}"}
        database = Path(folder) / "server.sqlite3"
        filled = fill(database, runs)
        size = os.path.getsize(database)
        picked = samples(database, requests + WARMUP, seed)
        since = "2026-11-30T00:00:00Z"
        kinds = {
            "first page": ["/api/runs?limit=20"] * (requests + WARMUP),
            "deep page": [f"/api/runs?limit=20&cursor={c}" for c in picked["cursors"]],
            "user": ["/api/runs?limit=20"] * (requests + WARMUP),
            "agentId": [
                f"/api/runs?limit=20&agentId={AGENTS[i % 5]}" for i in range(requests + WARMUP)
            ],
            "status=FAILED": ["/api/runs?limit=20&status=FAILED"] * (requests + WARMUP),
            "status=RUNNING": ["/api/runs?limit=20&status=RUNNING"] * (requests + WARMUP),
            "sessionId": [f"/api/runs?limit=20&sessionId={s}" for s in picked["sessions"]],
            "since": [f"/api/runs?limit=20&since={since}"] * (requests + WARMUP),
            "batch status (baseline)": [
                "/api/agents/assistant/runs/status?runIds=" + ",".join(ids)
                for ids in picked["batches"]
            ],
        }
        results = {}
        with server, httpx.Client(base_url=server.url, timeout=30) as client:
            for kind, urls in kinds.items():
                headers = user_headers if kind == "user" else server.headers
                results[kind] = measure(client, urls, headers)
                print(f"{runs:>9} runs  {kind:<24} {results[kind]}", file=sys.stderr)
        return {"runs": runs, "fill_seconds": filled, "database_bytes": size, "kinds": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000, help="the comparison's table size")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per kind")
    parser.add_argument("--seed", type=int, default=19)
    options = parser.parse_args()
    sizes = [options.small, options.runs]
    report = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "requests": options.requests,
        "sizes": [bench_size(size, options.requests, options.seed) for size in sizes],
    }
    small, large = report["sizes"]
    print(
        f"\n| request | p50 ms, {small['runs']:,} runs | p50 ms, {large['runs']:,} | "
        f"p99 ms, {small['runs']:,} | p99 ms, {large['runs']:,} |"
    )
    print("|---|---:|---:|---:|---:|")
    for kind in large["kinds"]:
        a, b = small["kinds"][kind], large["kinds"][kind]
        print(
            f"| {kind} | {a['p50_ms']:.2f} | {b['p50_ms']:.2f} | "
            f"{a['p99_ms']:.2f} | {b['p99_ms']:.2f} |"
        )
    print(
        f"\nfilled {large['runs']:,} runs in {large['fill_seconds']:.0f} s "
        f"({large['database_bytes'] / 2**20:.0f} MiB)"
    )
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (results / f"run_listing-{stamp}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
