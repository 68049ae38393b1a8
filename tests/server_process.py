"""A real `flashgen serve` in a subprocess on a free 127.0.0.1 port, for the server tests.

    with ServerProcess(["--model", model_path, "--max-seq-len", "256"]) as server:
        client = server.client()             # the real openai client, max_retries=0
        server.metrics()["num_requests_running"]
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

STARTUP_TIMEOUT_S = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args, api_key=None):
        self.args, self.api_key = list(args), api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = tempfile.TemporaryFile(mode="w+")

    def __enter__(self):
        cmd = [sys.executable, "-m", "flashgen", "serve", "--port", str(self.port), *self.args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        # Outside the repository root, whose kernels/ and engine/ folders would shadow other packages.
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                     env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start in {STARTUP_TIMEOUT_S} s:\n{self.output()}")

    def __exit__(self, *exc):
        self.stop()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send `sig` and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0,
                             timeout=120, **kwargs)

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, parsed JSON or text) of one raw HTTP request; body: bytes, str or a JSON-able object."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        hdrs = {"Content-Type": "application/json"}
        if self.api_key:
            hdrs["Authorization"] = f"Bearer {self.api_key}"
        hdrs.update(headers or {})
        try:
            conn.request(method, path, body=body, headers={k: v for k, v in hdrs.items() if v is not None})
            response = conn.getresponse()
            data = response.read().decode()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data

    def metrics(self):
        """{name without the flashgen: prefix: value} of the unlabelled-bucket samples of /metrics."""
        status, text = self.request("GET", "/metrics")
        assert status == 200
        values = {}
        for line in text.splitlines():
            m = re.match(r"flashgen:(\w+)\{[^}]*\} (\S+)$", line)
            if m and "_bucket" not in m.group(1):
                values[m.group(1)] = float(m.group(2))
        return values

    def wait_idle(self, timeout=2.0):
        """Metrics once no request runs or waits and every KV block is free; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and \
                    m["kv_cache_free_blocks"] == m["kv_cache_num_blocks"]:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server is not idle after {timeout} s: {m}")
            time.sleep(0.05)

    @property
    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024
