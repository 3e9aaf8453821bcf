"""gunicorn settings for Agent Runs. Imports nothing from the application.

Every AGENT_RUNS_* setting of the application itself is read from the environment by the app;
the ones here shape the server around it.
"""

import glob
import multiprocessing
import os
import shutil
import tempfile

bind = os.environ.get("AGENT_RUNS_BIND", "127.0.0.1:8080")

# The gevent worker serves each connection in a greenlet, so one worker holds thousands of
# open streams; it monkey-patches the standard library before the application is loaded.
worker_class = "gevent"
workers = int(os.environ.get("AGENT_RUNS_WORKERS", min(2, multiprocessing.cpu_count())))

# gunicorn's default of 1,000 connections per worker would queue every stream past the
# thousandth; the listen backlog must absorb bursts of new streams as well.
worker_connections = int(os.environ.get("AGENT_RUNS_WORKER_CONNECTIONS", 10_000))
backlog = int(os.environ.get("AGENT_RUNS_BACKLOG", 4096))

# For the gevent worker, timeout only bounds how long the worker may go without a heartbeat;
# streams may last far longer than this. On SIGTERM, in-flight runs get graceful_timeout.
timeout = 60
graceful_timeout = int(os.environ.get("AGENT_RUNS_GRACEFUL_TIMEOUT", 30))
# How long a connection may sit idle, before its first request or between two, before the
# worker closes it. Behind a load balancer that keeps its connections to the server open,
# make it longer than the balancer's idle timeout (60 s on AWS's), or the balancer sends
# requests down connections the server is closing.
keepalive = int(os.environ.get("AGENT_RUNS_KEEPALIVE", 5))

accesslog = os.environ.get("AGENT_RUNS_ACCESS_LOG", "-") or None
loglevel = os.environ.get("AGENT_RUNS_LOG_LEVEL", "info")

# AGENT_RUNS_LOG_FORMAT=json: gunicorn's own lines are JSON objects in the fields the
# application writes (agent_runs.logs), and its root logger writes the application's lines.
if os.environ.get("AGENT_RUNS_LOG_FORMAT", "").strip().lower() == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "{levelname}{name}{message}",
                "style": "{",
                "rename_fields": {"levelname": "level", "name": "logger"},
                "timestamp": "time",
            }
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json"},
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            },
        },
        "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {
                "level": loglevel.upper(),
                "handlers": ["stderr"],
                "propagate": False,
            },
            # With a logging configuration, gunicorn writes access lines even without an
            # access log; a level above theirs keeps them out.
            "gunicorn.access": {
                "level": "INFO" if accesslog else "WARNING",
                "handlers": ["stdout"],
                "propagate": False,
            },
        },
    }

# GET /api/metrics adds up every worker's counts: each worker writes its figures to files of
# its own in one directory (prometheus-client's multiprocess mode), which must be named before
# the workers load the application and hold nothing of an earlier server. One set here is
# kept (and emptied); otherwise the server makes one, and removes it when it stops.
METRICS_DIR_PREFIX = "agent-runs-metrics-"
metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if not metrics_dir:
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
        prefix=METRICS_DIR_PREFIX
    )
    # Whoever made it removes it: not a server started by this one and inheriting the name.
    os.environ["AGENT_RUNS_METRICS_DIR_MADE_BY"] = str(os.getpid())
os.makedirs(metrics_dir, exist_ok=True)


def on_starting(server):
    """Forget the counts of an earlier server that used the same metrics directory."""
    for path in glob.glob(os.path.join(metrics_dir, "*.db")):
        os.remove(path)


def child_exit(server, worker):
    """Stop counting a dead worker's gauges (its counters' totals stay).

    prometheus-client's multiprocess.mark_process_dead does this; its files are removed by
    their names here instead, since importing prometheus-client in the master would hand the
    workers forked later its lock made before gevent patched threading.
    """
    for path in glob.glob(os.path.join(metrics_dir, f"gauge_live*_{worker.pid}.db")):
        os.remove(path)


def on_exit(server):
    if os.environ.get("AGENT_RUNS_METRICS_DIR_MADE_BY") == str(os.getpid()):
        shutil.rmtree(metrics_dir, ignore_errors=True)


# gunicorn's control socket lives at one fixed path per user, which several servers on one
# machine would fight over; Agent Runs needs none of its commands.
control_socket_disable = True


def post_worker_init(worker):
    """Make each worker's garbage collector cheap once the application is loaded, and its
    event loop quicker to notice new requests.

    A worker holding a thousand streams holds a few hundred thousand live objects, and
    CPython's default thresholds ran a full collection over all of them every couple of
    seconds: a 100 ms stop of every stream on the worker, and a tenth of its CPU in young
    collections. Freezing what the application loaded takes it out of every collection for
    good; a larger first threshold makes young collections rarer (their garbage is small:
    reference counting frees the rest at once).
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 10)

    # gevent runs the greenlets that became ready for at most the interpreter's switch
    # interval before it polls for I/O again. When a thousand streams wake together, the
    # default 5 ms made a new request (a status poll, a new stream) wait for whole rounds of
    # them; at 1 ms, status answered in half the time (p50) while 1,000 streams ran, for the
    # same CPU per event. (The interval also paces the GIL between threads; the worker's
    # threads, SQLite checkpoints and the embedded model, spend their time in C without it.)
    import sys

    sys.setswitchinterval(0.001)
