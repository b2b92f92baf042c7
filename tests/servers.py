"""Real servers on the loopback for the remote-storage tests, started and stopped by the tests themselves.

- `RangeServer`: HTTP/1.1 serving a folder with Range support (single ranges, as S3 and CDNs answer them),
  counting the body bytes and requests it served; faults on demand: every k-th request answered 503, every
  k-th request's connection dropped halfway through its body, a delay before each answer.
- `FaultyProxy`: a TCP proxy in front of any server (moto's S3 API) that drops every k-th connection at once
  and counts the bytes it carried back.
- `moto_s3()`: moto's S3 server in a thread on 127.0.0.1, with the AWS_* variables pointing at it.
Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(?:GET|HEAD|PUT|POST|DELETE) \S+ HTTP/1\.[01]\r\n")


class RangeServer:
    def __init__(self, folder: Path, fail_every: int = 0, drop_every: int = 0, delay: float = 0.0,
                 ignore_range: bool = False, redirect_to: str | None = None, endless: str | None = None):
        self.folder = Path(folder)
        self.endless = endless  # this file name is answered with bytes that never end
        self.redirect_to = redirect_to  # answer every request with a 302 to this URL prefix
        self.ignore_range = ignore_range  # as `python -m http.server`: 200 and the whole file, whatever was asked
        self.fail_every, self.drop_every, self.delay = fail_every, drop_every, delay
        self.bytes_sent = self.requests = self.failed = self.dropped = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # headers and body in one send: unbuffered, Nagle and delayed ACKs cost 40 ms each

            def log_message(self, *args):
                pass

            def _count(self) -> int:
                with server._lock:
                    server.requests += 1
                    return server.requests

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

            def _answer(self, head: bool):
                n = self._count()
                if server.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.endless and self.path.split("?")[0].lstrip("/") == server.endless:
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 40))
                    self.end_headers()
                    try:
                        while not head:
                            self.wfile.write(b"{" * (1 << 16))
                    except OSError:  # the client stopped reading
                        self.close_connection = True
                    return
                if server.delay:
                    time.sleep(server.delay)
                if server.fail_every and n % server.fail_every == 0:
                    server.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = (server.folder / self.path.split("?")[0].lstrip("/")).resolve()
                if server.folder.resolve() not in path.parents or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                m = None if server.ignore_range else _RANGE.match(self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
                    body = data[start:end]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                if server.drop_every and n % server.drop_every == 0 and len(body) > 1:
                    server.dropped += 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)
                with server._lock:
                    server.bytes_sent += len(body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # clients open many connections at once; the default 5 drops SYNs (1 s+)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultyProxy:
    """Forwards 127.0.0.1:port to `target`; every `drop_every`-th connection is closed before a byte moves.
    Counts the bytes carried back and the HTTP requests carried there (their request lines)."""

    def __init__(self, target: tuple[str, int], drop_every: int = 0):
        self.target, self.drop_every = target, drop_every
        self.connections = self.bytes_back = self.requests = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _pipe(self, src, dst, back: bool):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if back:
                        self.bytes_back += len(data)
                    else:
                        self.requests += len(_REQUEST_LINE.findall(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _serve(self):
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
            if self.drop_every and n % self.drop_every == 0:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.sock.close()


@contextlib.contextmanager
def moto_s3(bucket: str = "shards"):
    """moto's S3 API on 127.0.0.1 (a fresh, empty server); yields (host, port) with one bucket made."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in _AWS}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        yield host, port
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
