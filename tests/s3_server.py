"""A real S3 endpoint on loopback for tests and benchmarks: moto's server, plus a fault injector.

:func:`moto_s3` starts ``ThreadedMotoServer`` in a child process (so the server
and the code under test do not share a GIL), creates an IAM user whose key is
the only one accepted (moto checks signatures once auth is on), and a bucket.
Everything talks to it over HTTP with the real boto3 client; nothing is patched
in-process.

:class:`FaultyProxy` sits between boto3 and the server and answers a share of
requests with HTTP 503 ``SlowDown``, HTTP 500 ``InternalError``, or a dropped
connection, before or after forwarding them.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

REGION = "us-east-1"

_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # run until the parent closes our stdin
server.stop()
"""


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    bucket: str

    def client(self, url: str | None = None, secret_key: str | None = None):
        import boto3

        from tfjobs.storage.s3 import botocore_config

        return boto3.session.Session().client(
            "s3", endpoint_url=url or self.url, region_name=REGION, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, config=botocore_config(),
        )

    def airflow_connection(self, url: str | None = None) -> str:
        """The ``AIRFLOW_CONN_<ID>`` value for this endpoint (conn_type aws, endpoint_url in extra)."""
        return json.dumps({
            "conn_type": "aws", "login": self.access_key, "password": self.secret_key,
            "extra": {"endpoint_url": url or self.url, "region_name": REGION},
        })

    def environment(self, url: str | None = None) -> dict[str, str]:
        """The standard AWS variables that point boto3 at this endpoint."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": url or self.url}


@contextlib.contextmanager
def moto_s3(bucket: str = "shardline") -> Iterator[S3Endpoint]:
    import boto3

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        setup = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup", region_name=REGION)
        iam = setup.client("iam", endpoint_url=url)
        iam.create_user(UserName="shardline")
        iam.put_user_policy(UserName="shardline", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        key = iam.create_access_key(UserName="shardline")["AccessKey"]
        endpoint = S3Endpoint(url, key["AccessKeyId"], key["SecretAccessKey"], bucket)
        # From here on moto checks every request's signature against the IAM user's key.
        http_post(f"{url}/moto-api/reset-auth", b"0")
        endpoint.client().create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def http_post(url: str, body: bytes) -> None:
    parsed = http.client.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    connection.request("POST", parsed.path, body=body)
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"POST {url} answered {response.status}")


_SLOW_DOWN = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
_INTERNAL = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultyProxy:
    """An HTTP proxy in front of ``target`` that fails ``share`` of the requests it sees.

    Faults, chosen at random with a fixed seed: 503 SlowDown or 500 InternalError
    instead of forwarding, a connection dropped before forwarding, or one dropped
    after the server has answered (so the request took effect, its answer is lost).
    """

    FAULTS = ("slow_down", "internal_error", "drop_before", "drop_after")

    def __init__(self, target: str, share: float = 0.2, seed: int = 1, on_request=None):
        self.target = http.client.urlsplit(target)
        # on_request(method, path, headers), called before each request is forwarded, may block (to hold a
        # client); when it returns "drop", the connection is dropped instead.
        self.on_request = on_request
        self.share = share
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy.pick_fault()
                if fault in ("slow_down", "internal_error"):
                    payload = _SLOW_DOWN if fault == "slow_down" else _INTERNAL
                    self.send_response(503 if fault == "slow_down" else 500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "drop_before":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if proxy.on_request is not None and proxy.on_request(self.command, self.path, self.headers) == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)
                    return
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if fault == "drop_after":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                with proxy.lock:
                    proxy.forwarded += 1
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def pick_fault(self) -> str | None:
        with self.lock:
            if self.random.random() >= self.share:
                return None
            fault = self.random.choice(self.FAULTS)
            self.injected[fault] += 1
            return fault

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
