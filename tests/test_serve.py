"""`agent-runs serve`: migrates, announces a first token once, and serves under gunicorn."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from agent_runs.cli import _curl_target

from .server import wait_until_serving


def serve(folder, env):
    """Start `agent-runs serve` on a free port; return the process, its output and its URL."""
    log_path = folder / f"serve-{time.monotonic_ns()}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent_runs", "serve", "--bind", "127.0.0.1:0", "--workers", "1"],
        env=env,
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = wait_until_serving(process, log_path)
    except RuntimeError:
        process.kill()
        raise
    return process, log_path.read_text(errors="replace"), url


def stop(process):
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=35)


def test_serve_announces_a_first_token_once_and_serves_with_it(tmp_path):
    env = {
        **os.environ,
        "AGENT_RUNS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        "AGENT_RUNS_ACCESS_LOG": "",
    }
    process, output, url = serve(tmp_path, env)
    try:
        [token] = set(re.findall(r"ar_[A-Za-z0-9_-]{20,}", output))
        # Port 0 is only known once gunicorn has bound it: the hint says where to read it.
        assert "curl -N http://127.0.0.1:PORT/api/agents/finance_agent/runs/stream" in output
        assert f'-H "Authorization: Bearer {token}"' in output
        assert "with the same token: http://127.0.0.1:PORT/api/playground" in output
        assert "Using worker: gevent" in output
        with requests.post(
            f"{url}/api/agents/assistant/runs",
            headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            json={"message": "hello"},
            timeout=10,
        ) as response:
            assert response.status_code == 200
            assert response.json()["content"] == "You said: hello"
    finally:
        stop(process)

    process, output, _ = serve(tmp_path, env)
    stop(process)
    assert "ar_" not in output and "No API token existed" not in output


@pytest.mark.parametrize(
    "bind, command, origin",
    [
        ("127.0.0.1:8080", "curl -N", "http://127.0.0.1:8080"),
        ("0.0.0.0:9000", "curl -N", "http://127.0.0.1:9000"),
        ("[::]:9000", "curl -N", "http://[::1]:9000"),
        ("[::1]:9000", "curl -N", "http://[::1]:9000"),
        ("example.internal", "curl -N", "http://example.internal:8000"),
        ("127.0.0.1:0", "curl -N", "http://127.0.0.1:PORT"),
        (
            "unix:/run/agent runs.sock",
            "curl -N --unix-socket '/run/agent runs.sock'",
            "http://localhost",
        ),
        ("tcp://0.0.0.0:9000", "curl -N", "http://127.0.0.1:9000"),
        ("unix:///run/agent.sock", "curl -N --unix-socket /run/agent.sock", "http://localhost"),
        ("unix://agent.sock", "curl -N --unix-socket agent.sock", "http://localhost"),
        ("fd://3", "curl -N", "http://HOST:PORT"),
    ],
)
def test_the_first_token_hint_points_curl_where_the_server_listens(bind, command, origin):
    assert _curl_target(bind)[:2] == (command, origin)


def test_gunicorn_workers_freeze_the_application_collect_less_and_poll_sooner(repo_root):
    import gc
    import runpy

    environ = dict(os.environ)
    settings = runpy.run_path(os.path.join(repo_root, "gunicorn.conf.py"))
    # The settings name a metrics directory for the workers of a server: not this process's.
    if settings["metrics_dir"] != environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.rmdir(settings["metrics_dir"])
    os.environ.clear()
    os.environ.update(environ)
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        settings["post_worker_init"](None)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] > thresholds[0]
        # gevent polls for I/O at least this often while greenlets are ready to run.
        assert sys.getswitchinterval() < interval
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)


def test_serve_loads_the_embedded_model_before_its_workers_and_says_how(tmp_path):
    env = {
        **os.environ,
        "AGENT_RUNS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        "AGENT_RUNS_ACCESS_LOG": "",
        "AGENT_RUNS_DEFAULT_MODEL": "local",
    }
    process, output, url = serve(tmp_path, env)
    stop(process)
    # Every bundled agent runs the same model: it is loaded, and announced, once.
    [line] = [line for line in output.splitlines() if line.startswith("Embedded model ")]
    assert "SmolLM2-135M-Instruct" in line and "loaded in" in line and "buffers" in line
    assert output.index("Embedded model ") < output.index("Booting worker")


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"hello", "{path} is not a GGUF model file"),
        # Looks like one to the server; llama.cpp refuses it in the model's process.
        (b"GGUF\x03\x00\x00\x00 truncated", "Failed to load model from file: {path}"),
    ],
)
def test_serve_names_a_model_file_that_cannot_load_once_and_serves_anyway(
    tmp_path, content, problem
):
    not_a_model = tmp_path / "model.gguf"
    not_a_model.write_bytes(content)
    env = {
        **os.environ,
        "AGENT_RUNS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        "AGENT_RUNS_ACCESS_LOG": "",
        "AGENT_RUNS_DEFAULT_MODEL": "local",
        "AGENT_RUNS_LOCAL_MODEL": str(not_a_model),
    }
    process, output, url = serve(tmp_path, env)
    try:
        said = "Error: the embedded model cannot run: " + problem.format(path=not_a_model)
        assert output.count(said) == 1, output
        [token] = set(re.findall(r"ar_[A-Za-z0-9_-]{20,}", output))
        headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
        agents = requests.get(f"{url}/api/agents", headers=headers, timeout=10).json()
        assert {"assistant", "finance_agent", "clock_agent"} <= {a["id"] for a in agents}
        run = requests.post(
            f"{url}/api/agents/assistant/runs", headers=headers, json={"message": "hi"}, timeout=30
        ).json()
        assert run["status"] == "FAILED" and run["error"]["type"] == "model_unavailable"
    finally:
        stop(process)
