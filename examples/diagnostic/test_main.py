"""Tests of the diagnostic program against a fake guest API and web servers
on loopback only: python3 -m unittest discover -s examples/diagnostic."""

import asyncio
import http.server
import json
import os
import socket
import socketserver
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class GuestAPI(http.server.BaseHTTPRequestHandler):
    store = {}

    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/cache/?"):
            return self.reply(200, list(self.store))
        if self.path.startswith("/cache/"):
            value = self.store.get(self.path[len("/cache/"):])
            if value is None:
                return self.reply(404, "No such key in cache")
            data = value.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.path.startswith("/api/v0/messages.json?hashes=abc"):
            return self.reply(200, {"messages": [{"item_hash": "abc"}]})
        if self.path == "/api/v0/messages/abc":
            return self.reply(200, {"message": {"item_hash": "abc"}, "status": "processed"})
        self.reply(404, {"error": "not found"})

    def do_PUT(self):
        n = int(self.headers.get("Content-Length", 0))
        self.store[self.path[len("/cache/"):]] = self.rfile.read(n).decode()
        self.reply(200, True)


class Web(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(404 if self.path == "/missing" else 200)
        self.end_headers()


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class DiagnosticTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        sock = os.path.join(cls.dir, "api.sock")
        cls.api = serve(UnixServer(sock, GuestAPI))
        cls.web4 = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Web))
        p4 = cls.web4.server_address[1]
        try:
            cls.web6 = serve(V6Server(("::1", 0), Web))
            v6 = f"http://[::1]:{cls.web6.server_address[1]}/missing"
        except OSError:
            cls.web6, v6 = None, ""
        os.environ.update(
            ALEPH_API_UNIX_SOCKET=sock,
            DIAG_DNS_NAME="localhost",
            DIAG_IPV4_URLS=f"http://127.0.0.1:1/,http://127.0.0.1:{p4}/missing",
            DIAG_IPV6_URLS=v6,
            DIAG_INTERNET_URLS=f"http://127.0.0.1:{p4}/",
            DIAG_MESSAGE_HASH="abc",
            DIAG_STATE_DIR=os.path.join(cls.dir, "state"),
        )
        import main

        cls.main = main

    @classmethod
    def tearDownClass(cls):
        for s in (cls.api, cls.web4, cls.web6):
            if s:
                s.shutdown()

    def call(self, path, scope_type="http"):
        out = []

        async def receive():
            return {"type": "lifespan.startup"} if scope_type == "lifespan" else {"type": "http.request"}

        async def send(m):
            out.append(m)
            if m["type"] == "lifespan.startup.complete":
                raise asyncio.CancelledError

        async def run():
            try:
                await self.main.app({"type": scope_type, "method": "GET", "path": path}, receive, send)
            except asyncio.CancelledError:
                pass

        asyncio.run(run())
        if scope_type != "http":
            return None, None
        body = out[1]["body"]
        try:
            return out[0]["status"], json.loads(body)
        except ValueError:
            return out[0]["status"], body.decode()

    def test_checks(self):
        self.call("", "lifespan")
        self.assertEqual(self.call("/"), (200, self.call("/")[1]))
        self.assertEqual(self.call("/")[1]["Example"], "example_fastapi")
        self.assertEqual(self.call("/lifespan"), (200, {"Lifespan": True}))
        status, env = self.call("/environ")
        self.assertEqual(status, 200)
        self.assertEqual(env["DIAG_MESSAGE_HASH"], "abc")
        status, body = self.call("/dns")
        self.assertTrue(body["ipv4"])
        self.assertEqual(self.call("/ip/4"), (200, {"result": True, "headers": {}}))
        if self.web6:
            self.assertEqual(self.call("/ip/6"), (200, {"result": True, "headers": {}}))
        status, body = self.call("/internet")
        self.assertEqual((status, body["result"]), (200, 200))
        self.assertEqual(self.call("/messages"), (200, {"Messages": {"messages": [{"item_hash": "abc"}]}}))
        self.assertEqual(self.call("/get_a_message"), (200, {"item_hash": "abc"}))
        self.assertEqual(self.call("/cache/set/a/42"), (200, True))
        self.assertEqual(self.call("/cache/get/a"), (200, "42"))
        self.assertEqual(self.call("/cache/keys"), (200, ["a"]))
        self.assertEqual(self.call("/state/increment"), (200, {"counter": 1}))
        self.assertEqual(self.call("/state/increment"), (200, {"counter": 2}))
        status, body = self.call("/raise")
        self.assertEqual(status, 500)
        self.assertIn("Traceback", body)
        self.assertEqual(self.call("/nope")[0], 404)

    def test_events(self):
        async def run():
            async def receive():
                return {"type": "aleph.message", "body": '{"item_hash": "ab"}', "more_body": False}

            async def send(_m):
                pass

            await self.main.app({"type": "aleph.message"}, receive, send)

        asyncio.run(run())
        self.assertEqual(self.call("/events"), (200, [{"item_hash": "ab"}]))

    def test_failures_are_503(self):
        saved = dict(os.environ)
        try:
            os.environ.update(DIAG_IPV4_URLS="http://127.0.0.1:1/", DIAG_INTERNET_URLS="http://127.0.0.1:1/",
                              DIAG_MESSAGE_HASH="unknown")
            status, body = self.call("/ip/4")
            self.assertEqual((status, body["result"]), (503, False))
            self.assertEqual(self.call("/internet")[0], 503)
            self.assertEqual(self.call("/messages")[0], 503)
            self.assertEqual(self.call("/get_a_message")[0], 503)
        finally:
            os.environ.clear()
            os.environ.update(saved)


if __name__ == "__main__":
    unittest.main()
