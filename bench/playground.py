"""The playground page's first load in Chromium: bytes over the wire and time to interactive.

    python bench/playground.py                    # 20 cold and 20 warm loads a target (~25 s)
    python bench/playground.py --cold 5 --warm 5

Two gunicorns of the same kind (the project's gunicorn.conf.py, one gevent worker, on
127.0.0.1 port 0, no access log) serve three targets:

- ``playground``: ours, ``agent_runs:create_app()`` (SQLite in a temporary folder) at
  ``/api/playground``: the HTML, its style sheet and its script.
- ``same_files``: bench/page_baseline.py, a bare Flask app serving the same three files with
  the same headers and revalidation: the same page without our application, so the
  difference is what our app costs a request.
- ``minimal``: the same bare app's ``/minimal``, one tiny HTML page with a token field and no
  other request: what any page costs in this browser from this kind of server.

bench/playground.js drives Debian's Chromium (headless, through tests/browser's
playwright-core). A **cold** load is a fresh browser context (empty cache, new connection);
**warm** loads reuse one context per target (its HTTP cache, its kept-alive connection),
each from about:blank. The files are served with ``max_age=0`` and an ETag, so a warm load
revalidates each one (304) rather than using it unasked. Targets take turns in each round.

**Time to interactive** is measured in the page: from navigation start (``performance``'s
time origin) to the first moment, at DOMContentLoaded or later, that the token field is
visible and enabled. For the playground that means its deferred script has run (the login
form is ``hidden`` in the HTML until the script shows it), its handlers are attached and the
field has focus; the style sheet, which blocks the script, has loaded too. Beside it:
responseStart (first byte of the HTML), first contentful paint, and the load event.

**Bytes** are what Chromium received for every request the page made, as the DevTools
protocol counts them (playwright's ``request.sizes()``): response headers plus the body as
transferred, so compressed if the server compressed (ours does not); ``sent`` is the request
headers. The count is of requests that went out (``data:`` URLs excluded); ``bodies`` is how
many of the responses carried a body (a 304 carries none; Chromium reports the document's 304
as the cached 200 it stands for, with a body of 0). The raw and gzip sizes of the three files
are printed too, for what compression would save.

Results go to stdout as a table and to ``bench/results/playground-<timestamp>.json``, with
every sample. The loops are bounded by count and by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests.server import GunicornServer, wait_until_serving  # noqa: E402

PLAYGROUND = REPO / "app" / "playground"
NODE_MODULES = REPO / "tests" / "browser" / "node_modules"
TARGETS = ("playground", "same_files", "minimal")


class BaselineServer:
    """``with BaselineServer(folder) as server:`` serves bench/page_baseline.py under gunicorn
    with the project's gunicorn.conf.py and the flags GunicornServer gives ours."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log_path = folder / "baseline.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> BaselineServer:
        python_path = os.pathsep.join(
            p for p in (str(BENCH), str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        env = {**os.environ, "AGENT_RUNS_ACCESS_LOG": "", "PYTHONPATH": python_path}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--config",
                    str(REPO / "gunicorn.conf.py"),
                    "--bind",
                    "127.0.0.1:0",
                    "--workers",
                    "1",
                    "page_baseline:app",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        try:
            self.url = wait_until_serving(self.process, self.log_path)
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as bench/stats.py's percentiles."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def summarise(loads: list[dict]) -> dict:
    """p50 and p95 of each figure over the loads, and what every load requested."""
    figures = {
        "interactive_ms": [s["interactiveMs"] for s in loads],
        "response_start_ms": [s["responseStartMs"] for s in loads],
        "first_contentful_paint_ms": [
            s["firstContentfulPaintMs"] for s in loads if s["firstContentfulPaintMs"] is not None
        ],
        "load_event_ms": [s["loadMs"] for s in loads],
        "received_bytes": [sum(r["received"] for r in s["requests"]) for s in loads],
        "sent_bytes": [sum(r["sent"] for r in s["requests"]) for s in loads],
        "requests": [len(s["requests"]) for s in loads],
    }
    summary: dict = {"n": len(loads)}
    for name, values in figures.items():
        if values:
            summary[name] = {
                "p50": round(percentile(values, 0.50), 1),
                "p95": round(percentile(values, 0.95), 1),
            }
    statuses: dict[str, int] = {}
    for s in loads:
        for r in s["requests"]:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    summary["statuses"] = statuses
    responses = [r for s in loads for r in s["requests"]]
    summary["with_body"] = f"{sum(1 for r in responses if r['body'] > 0)}/{len(responses)}"
    summary["focused"] = sum(1 for s in loads if s["focused"])
    summary["errors"] = sorted({e for s in loads for e in s["errors"]})
    return summary


def file_sizes() -> dict[str, dict[str, int]]:
    return {
        path.name: {
            "raw": len(data := path.read_bytes()),
            "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        }
        for path in sorted(PLAYGROUND.iterdir())
    }


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", type=int, default=20, help="cold loads per target")
    parser.add_argument("--warm", type=int, default=20, help="warm loads per target")
    parser.add_argument("--max-seconds", type=float, default=300, help="cap on the loops")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the servers' folder and logs")
    args = parser.parse_args()

    if not (NODE_MODULES / "playwright-core").is_dir():
        sys.exit("playwright-core is missing: cd tests/browser && npm ci (no browser download)")
    for needed in ("/usr/bin/chromium", shutil.which("node")):
        if not needed or not os.access(needed, os.X_OK):
            sys.exit("needs node and /usr/bin/chromium: apt-get install chromium nodejs npm")

    folder = Path(tempfile.mkdtemp(prefix="playground-bench-"))
    load_before = load_average()
    started = time.monotonic()
    try:
        with GunicornServer(folder) as ours, BaselineServer(folder) as bare:
            config = {
                "targets": {
                    "playground": f"{ours.url}/api/playground",
                    "same_files": f"{bare.url}/api/playground",
                    "minimal": f"{bare.url}/minimal",
                },
                "cold": args.cold,
                "warm": args.warm,
                "deadlineMs": int(args.max_seconds * 1000),
                "timeoutMs": 30000,
            }
            driver = subprocess.run(
                ["node", str(BENCH / "playground.js"), json.dumps(config)],
                capture_output=True,
                text=True,
                timeout=args.max_seconds + 120,
            )
        if driver.returncode != 0:
            sys.exit(f"the browser driver failed:\n{driver.stderr}")
        seen = json.loads(driver.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.monotonic() - started

    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "browser": f"Chromium {seen['browser']}",
        "load_before": load_before,
        "load_after": load_average(),
        "seconds": round(elapsed, 1),
        "cut_short": seen["cutShort"],
        "files": file_sizes(),
        "targets": {},
        "samples": seen["samples"],
    }
    for target in TARGETS:
        results["targets"][target] = {
            kind: summarise(seen["samples"][target][kind]) for kind in ("cold", "warm")
        }
    report(results)
    out = args.out or BENCH / "results" / f"playground-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")


def report(results: dict) -> None:
    print(f"{results['machine']}, {results['browser']}")
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if results["cut_short"]:
        print("cut short by --max-seconds: fewer loads than asked")
    files = results["files"]
    print(
        "files: "
        + ", ".join(f"{name} {s['raw']:,} B ({s['gzip']:,} gzipped)" for name, s in files.items())
    )
    columns = (
        ("interactive_ms", "TTI ms"),
        ("response_start_ms", "TTFB ms"),
        ("first_contentful_paint_ms", "FCP ms"),
        ("load_event_ms", "load ms"),
        ("received_bytes", "bytes in"),
        ("sent_bytes", "bytes out"),
        ("requests", "requests"),
    )
    head = f"{'target':<11} {'load':<5} {'n':>3}"
    for _, title in columns:
        head += f" {title + ' p50/p95':>19}"
    print(head + "  bodies")
    for target, kinds in results["targets"].items():
        for kind, s in kinds.items():
            line = f"{target:<11} {kind:<5} {s['n']:>3}"
            for key, _ in columns:
                figure = s.get(key)
                cell = f"{figure['p50']:g} / {figure['p95']:g}" if figure else "-"
                line += f" {cell:>19}"
            print(f"{line}  {s['with_body']:>7}")
            if s["errors"]:
                print(f"  console errors: {s['errors']}")


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
