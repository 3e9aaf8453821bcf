"""The benchmark's load client: a separate gevent process that talks to one server on loopback.

    python bench/load.py streams --url http://127.0.0.1:PORT --path /api/agents/bench/runs/stream
        --concurrency 1000 --message-length 200 --expected-events 56 --deadline 120 --out r.json
    python bench/load.py status --url ... --path /api/agents/bench/runs/status
        --ids-file ids.json --polls 200 --deadline 60 --out s.json

``streams`` opens C streams at once, reads every event, checks each stream (START first, ids
1, 2, 3 ... without a gap, STOP last, the expected number of events) and records the time to
the first event: from the moment its request is written to the socket, so the client's own
connection set-up is not counted against the server. Once every stream has its START (or
the start deadline passed) it prints ``STARTED <json list of the first 100 run ids>`` on
stdout, so a poller can watch them.

``status`` polls batch status for up to 100 ids over one keep-alive connection and records the
latency of each poll.

Everything is bounded: the phase's deadline cuts every read, and leftovers are killed.
Results go to ``--out`` as JSON; wall-clock times (time.time()) let the caller line phases up.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from stats import percentiles  # noqa: E402

RECV_SIZE = 65536
EVENT_PREFIX = b'{"event":"'
STARTED_IDS = 100


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class StreamError(Exception):
    """A stream that did not complete as it should; the message says what happened."""


class Stream:
    """One streaming request: its timings, the events it got and what went wrong, if anything."""

    __slots__ = (
        "index",
        "t_start",
        "t_sent",
        "t_first",
        "t_end",
        "events",
        "run_id",
        "error",
        "done",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.t_start = 0.0
        self.t_sent = 0.0
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.events = 0
        self.run_id: str | None = None
        self.error: str | None = None
        self.done = False


class StreamPhase:
    """Open ``concurrency`` streams at once and read them to the end, within ``deadline``."""

    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("the load client talks to loopback only")
        # Resolved once: socket.create_connection would ask gevent's resolver for every
        # stream, a trip through its thread pool that cost 100 streams ~8 ms each at p50.
        family, _, _, _, self.address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )[0]
        self.family = family
        self.args = args
        body = json.dumps({"message": make_message(args.message_length)}).encode()
        headers = [
            f"POST {args.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Accept: text/event-stream",
            "Connection: close",
        ]
        if args.token:
            headers.append(f"Authorization: Bearer {args.token}")
        self.request = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
        self.streams = [Stream(i) for i in range(args.concurrency)]
        self.all_started = gevent.event.Event()
        self.started = 0

    def run(self) -> dict:
        args = self.args
        self.t0 = time.perf_counter()
        self.t0_wall = time.time()
        self.deadline = self.t0 + args.deadline
        greenlets = [gevent.spawn(self.one_stream, stream) for stream in self.streams]
        announcer = gevent.spawn(self.announce_started)
        gevent.joinall(greenlets, timeout=args.deadline + 5)
        for greenlet, stream in zip(greenlets, self.streams, strict=True):
            if not greenlet.dead:
                greenlet.kill(block=False)
                stream.error = stream.error or f"deadline: killed after {stream.events} events"
        gevent.killall([g for g in greenlets if not g.dead], timeout=5)
        announcer.kill()
        if not self.all_started.is_set():
            self.print_started()
        return self.summary()

    def announce_started(self) -> None:
        self.all_started.wait(timeout=max(0.0, self.deadline - time.perf_counter()))
        self.print_started()

    def print_started(self) -> None:
        ids = [s.run_id for s in self.streams if s.run_id][:STARTED_IDS]
        print("STARTED " + json.dumps(ids), flush=True)

    def remaining(self) -> float:
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise StreamError("deadline passed")
        return left

    def one_stream(self, stream: Stream) -> None:
        stream.t_start = time.perf_counter()
        sock = None
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            sock.settimeout(self.remaining())
            sock.connect(self.address)
            sock.settimeout(self.remaining())
            stream.t_sent = time.perf_counter()
            sock.sendall(self.request)
            self.read_response(sock, stream)
            stream.done = True
        except StreamError as error:
            stream.error = str(error)
        except (OSError, ValueError) as error:
            stream.error = f"{type(error).__name__}: {error}"
        finally:
            stream.t_end = time.perf_counter()
            if stream.t_first is None:
                self.count_started()
            if sock is not None:
                sock.close()

    def count_started(self) -> None:
        self.started += 1
        if self.started == len(self.streams):
            self.all_started.set()

    def recv(self, sock: socket.socket) -> bytes:
        sock.settimeout(self.remaining())
        try:
            return sock.recv(RECV_SIZE)
        except TimeoutError:
            raise StreamError("deadline passed while waiting for data") from None

    def read_response(self, sock: socket.socket, stream: Stream) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = self.recv(sock)
            if not data:
                raise StreamError("connection closed before the response headers")
            buffer += data
            if len(buffer) > 65536:
                raise StreamError("response headers too long")
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        header = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        if status != 200:
            raise StreamError(f"HTTP {status}: {rest[:300].decode('utf-8', 'replace')}")
        if "chunked" not in header.get("transfer-encoding", "").lower():
            # Without chunking the body runs until the server closes the connection.
            self.read_events(stream, self.plain_body(sock, rest))
        else:
            self.read_events(stream, self.dechunked_body(sock, rest))

    def plain_body(self, sock: socket.socket, rest: bytes):
        if rest:
            yield rest
        while data := self.recv(sock):
            yield data

    def dechunked_body(self, sock: socket.socket, rest: bytes):
        """Yield the payload of a chunked body as it arrives; stop at the last chunk."""
        raw = bytearray(rest)
        while True:
            pos, pieces = 0, []
            while True:
                line_end = raw.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(bytes(raw[pos:line_end]).split(b";")[0], 16)
                end = line_end + 2 + size
                if len(raw) < end + 2:
                    break
                if size == 0:
                    if pieces:
                        yield b"".join(pieces)
                    return
                pieces.append(bytes(raw[line_end + 2 : end]))
                pos = end + 2
            if pos:
                del raw[:pos]
            if pieces:
                yield b"".join(pieces)
            data = self.recv(sock)
            if not data:
                raise StreamError("connection closed before the last chunk")
            raw += data

    def read_events(self, stream: Stream, body) -> None:
        """Check the frames of one stream: START first, gap-free ids, STOP last."""
        expected = self.args.expected_events
        buffer = b""
        finished = False
        for data in body:
            buffer += data
            pos = 0
            while True:
                end = buffer.find(b"\n\n", pos)
                if end < 0:
                    break
                frame = buffer[pos:end]
                pos = end + 2
                if frame.startswith(b":"):
                    continue  # a ping comment
                if finished:
                    raise StreamError(f"event after the final one: {frame[:100]!r}")
                id_line, _, data_line = frame.partition(b"\n")
                if not id_line.startswith(b"id: ") or not data_line.startswith(b"data: "):
                    raise StreamError(f"malformed frame: {frame[:100]!r}")
                seq = int(id_line[4:])
                if seq != stream.events + 1:
                    raise StreamError(f"id {seq} after id {stream.events}: a gap")
                payload = data_line[6:]
                if payload.startswith(EVENT_PREFIX):
                    kind = payload[10 : payload.index(b'"', 10)]
                else:
                    kind = json.loads(payload)["event"].encode()
                stream.events += 1
                if seq == 1:
                    if kind != b"START":
                        raise StreamError(f"first event is {kind.decode()}, not START")
                    stream.t_first = time.perf_counter()
                    stream.run_id = json.loads(json.loads(payload)["data"])["runId"]
                    self.count_started()
                elif kind == b"STOP":
                    finished = True
                elif kind == b"ERROR":
                    raise StreamError(f"ERROR event: {json.loads(payload)['data'][:300]}")
            buffer = buffer[pos:]
        if not finished:
            raise StreamError(f"stream ended after {stream.events} events without STOP")
        if expected and stream.events != expected:
            raise StreamError(f"{stream.events} events, expected {expected}")

    def summary(self) -> dict:
        streams = self.streams
        completed = [s for s in streams if s.done and s.error is None]
        errors = Counter(s.error for s in streams if s.error is not None)
        ttfe = [(s.t_first - s.t_sent) * 1000 for s in streams if s.t_first is not None]
        connect = [(s.t_sent - s.t_start) * 1000 for s in streams if s.t_sent]
        ends = [s.t_end for s in streams if s.t_end is not None]
        duration = (max(ends) if ends else time.perf_counter()) - self.t0
        events = sum(s.events for s in streams)
        return {
            "concurrency": len(streams),
            "completed": len(completed),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(20)),
            "events": events,
            "duration_s": duration,
            "events_per_s": events / duration if duration > 0 else None,
            "ttfe_ms": percentiles(ttfe),
            # The client's own time to connect (not part of TTFE), for the record.
            "connect_ms": percentiles(connect),
            "stream_ms": percentiles(
                [(s.t_end - s.t_start) * 1000 for s in completed if s.t_end is not None]
            ),
            "peak_open": peak_open(streams),
            "t0_wall": self.t0_wall,
            # Per run: events received, and when the stream ended (seconds after t0).
            "runs": {s.run_id: s.events for s in streams if s.run_id},
            "stream_spans": [
                [s.t_start - self.t0, (s.t_end or self.t0) - self.t0] for s in streams
            ],
        }


def peak_open(streams: list[Stream]) -> int:
    """Return the most streams that were open (had their START, not yet ended) at once."""
    moments = []
    for s in streams:
        if s.t_first is not None and s.t_end is not None:
            moments.append((s.t_first, 1))
            moments.append((s.t_end, -1))
    moments.sort(key=lambda m: (m[0], m[1]))
    open_now = peak = 0
    for _, change in moments:
        open_now += change
        peak = max(peak, open_now)
    return peak


def make_message(length: int) -> str:
    """Return a message of ``length`` characters: words, no quotes, no newlines."""
    words = "the quick brown fox jumps over the lazy dog while streams keep flowing "
    text = (words * (length // len(words) + 1))[:length]
    return text.rstrip() + "x" * (length - len(text.rstrip()))


def poll_status(args: argparse.Namespace) -> dict:
    """Poll batch status for the given ids ``polls`` times; return the latencies."""
    url = urlsplit(args.url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load client talks to loopback only")
    with open(args.ids_file) as file:
        ids = json.load(file)[:100]
    path = f"{args.path}?runIds={','.join(ids)}"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    deadline = time.perf_counter() + args.deadline
    latencies, times, errors = [], [], Counter()
    connection = None
    for _ in range(args.polls):
        left = deadline - time.perf_counter()
        if left <= 0:
            errors["deadline passed before the last poll"] += 1
            break
        if connection is None:
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=min(left, 30))
        wall, start = time.time(), time.perf_counter()
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - start) * 1000
            if response.status != 200:
                errors[f"HTTP {response.status}: {body[:200].decode('utf-8', 'replace')}"] += 1
            elif len(json.loads(body)) != len(ids):
                errors[f"{len(json.loads(body))} runs answered for {len(ids)} ids"] += 1
            else:
                latencies.append(elapsed)
                times.append(wall)
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                connection = None
        except (OSError, http.client.HTTPException) as error:
            errors[f"{type(error).__name__}: {error}"] += 1
            connection.close()
            connection = None
        if args.interval:
            gevent.sleep(args.interval)
    if connection is not None:
        connection.close()
    return {
        "ids": len(ids),
        "polls": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(10)),
        "latency_ms": percentiles(latencies),
        "samples": [[t, ms] for t, ms in zip(times, latencies, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    streams = commands.add_parser("streams", help="open C streams and read them to the end")
    streams.add_argument("--concurrency", type=int, required=True)
    streams.add_argument("--message-length", type=int, default=200)
    streams.add_argument("--expected-events", type=int, default=0)
    status = commands.add_parser("status", help="poll batch status for 100 ids")
    status.add_argument("--ids-file", required=True)
    status.add_argument("--polls", type=int, default=200)
    status.add_argument("--interval", type=float, default=0.0)
    for command in (streams, status):
        command.add_argument("--url", required=True)
        command.add_argument("--path", required=True)
        command.add_argument("--token", default="")
        command.add_argument("--deadline", type=float, default=60.0)
        command.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    limit = raise_open_files_limit()
    if args.command == "streams":
        if args.concurrency + 100 > limit:
            raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {args.concurrency} streams")
        result = StreamPhase(args).run()
    else:
        result = poll_status(args)
    with open(args.out, "w") as file:
        json.dump(result, file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
