"""The embedded model's own process: how it loads, how it is guarded, and what its crash costs.

The server tests run the real model (SmolLM2 through llama-cpp-python) in the real model host,
behind real gunicorn workers; the crash test kills that host with SIGKILL mid-run.
"""

import json
import os
import re
import signal
import threading
import time

import pytest
import requests

from agent_runs.providers.local import model_host, model_spec
from agent_runs.providers.local_host import (
    amx_repack_is_safe,
    check_gguf,
    cpu_flags,
    extra_buffer_types,
)

from .server import GunicornServer
from .sse import parse_stream

SAPPHIRE_RAPIDS_FLAGS = "fpu vme de pse avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8"


def test_an_amx_cpu_loads_without_extra_buffer_types_unless_the_operator_opts_in(tmp_path):
    amx = tmp_path / "cpuinfo-amx"
    amx.write_text(f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS_FLAGS}\n\n")
    epyc = tmp_path / "cpuinfo-epyc"
    epyc.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert "amx_tile" in cpu_flags(str(amx))
    assert not amx_repack_is_safe(cpu_flags(str(amx)), opt_in=False)
    assert amx_repack_is_safe(cpu_flags(str(amx)), opt_in=True)
    assert amx_repack_is_safe(cpu_flags(str(epyc)), opt_in=False)
    assert cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("enabled", [False, True])
def test_the_extra_buffer_switch_reaches_llama_cpp(enabled):
    from llama_cpp import Llama

    with extra_buffer_types(enabled):
        model = Llama(model_path=model_spec()["path"], n_ctx=256, verbose=False)
    try:
        assert model.model_params.use_extra_bufts is enabled
    finally:
        model.close()
    # Outside the block, llama-cpp-python's own defaults are back.
    import llama_cpp.llama_cpp as bindings

    assert bindings.llama_model_default_params().use_extra_bufts is True


def test_a_model_file_that_is_not_a_gguf_is_named_as_such(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert "no model file at" in check_gguf(str(tmp_path / "missing.gguf"))
    assert "is a directory" in check_gguf(str(tmp_path))
    assert "is not a GGUF model file" in check_gguf(str(text))
    assert check_gguf(model_spec()["path"]) is None


def test_an_agent_on_a_broken_model_file_fails_its_runs_saying_why(client, auth, agents, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"PK\x03\x04 a zip, not a model")
    agents("broken_local", model=f"local:{broken}")
    listed = client.get("/api/agents", headers=auth).json
    assert {"broken_local", "finance_agent", "assistant"} <= {a["id"] for a in listed}
    response = client.post("/api/agents/broken_local/runs", headers=auth, json={"message": "hi"})
    assert response.json["status"] == "FAILED"
    run = client.get(
        f"/api/agents/broken_local/runs/{response.json['runId']}/status", headers=auth
    ).json
    assert run["error"]["type"] == "model_unavailable"
    assert "is not a GGUF model file" in run["error"]["message"]


AGENTS_FILE = """
agents:
  - id: finance_agent
    instructions: >-
      You are a concise financial assistant. Use get_stock_price for any question about a
      stock's price, then answer in one sentence with the price in bold.
    tools: [agent_runs.runtime.demo_tools:get_stock_price]
    explain_tool_calls: true
    model: local
    model_options: {tool_choice: required}
  - id: storyteller
    instructions: You tell long stories.
    model: local
    model_options: {default_max_tokens: 400}
  - id: scripted_agent
    instructions: You answer by rule.
    tools: [agent_runs.runtime.demo_tools:get_stock_price]
    model: scripted
"""


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model-server")
    (folder / "agents.yaml").write_text(AGENTS_FILE)
    env = {"AGENT_RUNS_AGENTS_FILE": str(folder / "agents.yaml")}
    with GunicornServer(folder, workers=2, env=env) as server:
        yield server


def worker_pids(server) -> list[int]:
    log = server.log_path.read_text(errors="replace")
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log)]


def stream(server, agent, body, timeout=120):
    response = requests.post(
        f"{server.url}/api/agents/{agent}/runs/stream",
        headers={**server.headers, "Accept": "text/event-stream"},
        json=body,
        timeout=timeout,
    )
    assert response.status_code == 200, response.text
    return parse_stream(response.text)


def test_the_readme_example_streams_from_the_embedded_model_in_gunicorn(model_server):
    workers = worker_pids(model_server)
    for i in range(3):
        events = stream(
            model_server,
            "finance_agent",
            {
                "message": "What is the current NVDA stock price?",
                "sessionId": f"550e8400-e29b-41d4-a716-44665544000{i}",
            },
        )
        types = [e["event"] for e in events]
        assert types[0] == "START" and types[-1] == "STOP", types
        for kind in ("REASONING_DELTA", "TOOL_START", "TOOL_END", "CONTENT_DELTA"):
            assert kind in types, types
        assert json.loads(events[types.index("TOOL_START")]["data"])["name"] == "get_stock_price"
    # No worker died or was replaced, and both still run.
    assert worker_pids(model_server) == workers
    for pid in workers:
        os.kill(pid, 0)


def test_a_model_process_killed_mid_run_fails_that_run_and_nothing_else(model_server):
    workers = worker_pids(model_server)
    # The test shares the server's installation, so it reaches the same model host.
    host_pid = model_host().start(lease=False)["pid"]
    bystanders: list[list[dict]] = []

    def scripted_streams() -> None:
        for i in range(20):
            bystanders.append(
                stream(model_server, "scripted_agent", {"message": f"price of NVDA {i}"})
            )

    bystander = threading.Thread(target=scripted_streams)
    bystander.start()
    response = requests.post(
        f"{model_server.url}/api/agents/storyteller/runs/stream",
        headers=model_server.headers,
        json={"message": "Tell a long story about a lighthouse keeper."},
        stream=True,
        timeout=120,
    )
    lines = response.iter_lines(decode_unicode=True)
    text = ""
    while text.count("CONTENT_DELTA") < 3:
        text += next(lines) + "\n"
    killed = time.monotonic()
    os.kill(host_pid, signal.SIGKILL)
    text += "\n".join(lines)
    ended = time.monotonic()
    events = parse_stream(text)
    assert events[-1]["event"] == "ERROR", events[-1]
    assert "exited during the run" in events[-1]["data"]
    assert f"(pid {host_pid})" in events[-1]["data"]
    # Within a second, where a quiet machine takes milliseconds; generous for a busy CI one.
    assert ended - killed < 10
    run_id = json.loads(events[0]["data"])["runId"]
    status = requests.get(
        f"{model_server.url}/api/agents/storyteller/runs/{run_id}/status",
        headers=model_server.headers,
        timeout=10,
    ).json()
    assert status["status"] == "FAILED" and status["error"]["type"] == "model_crashed"

    bystander.join(timeout=120)
    assert len(bystanders) == 20
    assert all(events[-1]["event"] == "STOP" for events in bystanders)
    assert worker_pids(model_server) == workers

    # The next run of the model works: a new host has been started.
    events = stream(
        model_server, "storyteller", {"message": "Say hi.", "options": {"maxTokens": 8}}
    )
    assert events[-1]["event"] == "STOP" and "CONTENT_DELTA" in [e["event"] for e in events]
    assert model_host().start(lease=False)["pid"] != host_pid


def test_a_response_schema_holds_the_embedded_models_answer_to_it():
    from agent_runs.providers.base import ContentDelta, ModelRequest
    from agent_runs.providers.local import LocalProvider

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "population": {"type": "integer"},
            "coastal": {"type": "boolean"},
        },
        "required": ["city", "population", "coastal"],
    }
    request = ModelRequest(
        model="local",
        messages=[{"role": "user", "content": "Describe Lisbon as JSON."}],
        max_tokens=96,
        temperature=0.0,
        response_schema=schema,
    )
    deltas = [d for d in LocalProvider().stream(request) if isinstance(d, ContentDelta)]
    assert len(deltas) > 1  # streamed, token by token
    answer = json.loads("".join(d.text for d in deltas))
    assert set(answer) == {"city", "population", "coastal"}
    assert isinstance(answer["city"], str)
    assert isinstance(answer["population"], int) and isinstance(answer["coastal"], bool)


def test_a_request_the_model_refuses_fails_at_once_and_the_host_lives_on():
    from agent_runs.providers.local import ModelHostError

    host = model_host()
    spec = model_spec()
    pid = host.start([spec], lease=False)["pid"]
    started = time.monotonic()
    with pytest.raises(ModelHostError, match="UndefinedError|TypeError|messages"):
        list(host.chat(spec, {"messages": [1], "max_tokens": 4}))
    # An answer, not the chunk timeout of a host that went silent.
    assert time.monotonic() - started < 60
    assert host.start(lease=False)["pid"] == pid


def test_a_socket_folder_other_users_can_write_to_is_refused(tmp_path, monkeypatch):
    from agent_runs.providers.local import ModelHost, ModelHostError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("AGENT_RUNS_MODEL_HOST_DIR", str(shared))
    with pytest.raises(ModelHostError, match="can be read or written by other users"):
        ModelHost(allow_amx=False).start(lease=False)
