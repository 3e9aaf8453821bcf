"""Serve the embedded model over llama-cpp-python's OpenAI-compatible server, on a free port.

Run as a script: binds 127.0.0.1:0, prints the port on its first line, then serves until
killed. The socket is bound here and handed to uvicorn, so no port is guessed.
"""

from __future__ import annotations

import socket
import sys

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

from agent_runs.providers.local import bundled_model_path
from agent_runs.providers.local_host import amx_repack_is_safe, cpu_flags, extra_buffer_types


def main() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    # The server loads its model here; on an AMX CPU it must stay off the AMX kernels too.
    with extra_buffer_types(amx_repack_is_safe(cpu_flags(), opt_in=False)):
        app = create_app(
            server_settings=ServerSettings(host="127.0.0.1", port=0),
            model_settings=[
                ModelSettings(
                    model=bundled_model_path(), model_alias="smollm2", n_ctx=2048, verbose=False
                )
            ],
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[listener])


if __name__ == "__main__":
    sys.exit(main())
