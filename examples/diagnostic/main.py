"""The node's diagnostic program: answers every sub-check the node's
/status/check/fastapi makes, as the reference's example_fastapi does, with
Python's standard library only (the default runtime has uvicorn, not
FastAPI or the Aleph SDK).

The guest API (cache, core node messages) is reached as the SDK reaches it:
HTTP on the unix socket ALEPH_API_UNIX_SOCKET. The targets of the network
checks come from the environment the node gives the program, so that a
node's tests can point them at their own namespaces:

  DIAG_DNS_NAME        name resolved by /dns (example.org)
  DIAG_IPV4_URLS       URLs tried by /ip/4, comma-separated
  DIAG_IPV6_URLS       URLs tried by /ip/6
  DIAG_INTERNET_URLS   URLs tried by /internet
  DIAG_MESSAGE_HASH    message read by /messages and /get_a_message
  DIAG_STATE_DIR       where /state/increment keeps its counter
"""

import asyncio
import http.client
import json
import os
import socket
import ssl
import traceback
import urllib.parse

DEFAULT_MESSAGE = "3fc0aa9569da840c43e7bd2033c3c580abb46b007527d6d20f2d4e98e867f7af"
lifespan_done = False
# The messages of the network the program subscribes to, as the node
# delivered them (the last 100): /events lists them.
events = []


def env_list(name, default):
    value = os.environ.get(name, "")
    return [u.strip() for u in value.split(",") if u.strip()] or default


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the guest API's unix socket."""

    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def guest_api(method, path, body=None, raw=False):
    """Calls the node's guest API; returns (status, decoded JSON, or text
    when raw or not JSON)."""
    sock = os.environ.get("ALEPH_API_UNIX_SOCKET", "/tmp/socat-socket")
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        data = resp.read()
        if raw:
            return resp.status, data.decode(errors="replace")
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def fetch(url, family=socket.AF_UNSPEC, timeout=5):
    """GETs url over the given address family; returns its status."""
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    addrs = socket.getaddrinfo(u.hostname, port, family, socket.SOCK_STREAM)
    if not addrs:
        raise OSError(f"no address for {u.hostname}")
    af, kind, proto, _, addr = addrs[0]
    sock = socket.socket(af, kind, proto)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
        if u.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        host = u.netloc.rsplit("@", 1)[-1]
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: alephvm-diagnostic\r\n\r\n".encode())
        line = b""
        while b"\r\n" not in line and len(line) < 4096:
            chunk = sock.recv(1024)
            if not chunk:
                break
            line += chunk
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise OSError(f"{url}: not an HTTP answer")
        return int(parts[1])
    finally:
        sock.close()


async def first_success(urls, family, accept_404=False):
    """Tries urls at once; the first that answers well wins."""
    failures = []

    async def one(url):
        status = await asyncio.to_thread(fetch, url, family)
        if status < 400 or (accept_404 and status == 404):
            return status
        raise OSError(f"status {status}")

    tasks = {asyncio.create_task(one(u)): u for u in urls}
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            try:
                status = t.result()
            except Exception as e:  # noqa: BLE001 - each failure is reported
                failures.append({"host": tasks[t], "reason": str(e), "error_type": type(e).__name__})
                continue
            for p in pending:
                p.cancel()
            return {"result": status, "headers": {}, "url": tasks[t]}, failures
    return None, failures


def index():
    return 200, {
        "Example": "example_fastapi",
        "endpoints": [
            "/environ", "/messages", "/dns", "/ip/4", "/ip/6", "/internet", "/get_a_message",
            "/cache/get/{key}", "/cache/set/{key}/{value}", "/cache/remove/{key}", "/cache/keys",
            "/state/increment", "/raise", "/crash", "/lifespan", "/events",
        ],
    }


def dns():
    name = os.environ.get("DIAG_DNS_NAME", "example.org")
    ipv4 = ipv6 = None
    info = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
    for family, _, _, _, addr in info:
        if family == socket.AF_INET:
            ipv4 = addr[0]
        elif family == socket.AF_INET6:
            ipv6 = addr[0]
    return (200 if len(info) > 1 else 503), {"ipv4": ipv4, "ipv6": ipv6}


async def connect(family, name, defaults):
    result, failures = await first_success(env_list(name, defaults), family, accept_404=True)
    if result is None:
        return 503, {"result": False, "failures": failures}
    return 200, {"result": True, "headers": {}}


async def internet():
    urls = env_list("DIAG_INTERNET_URLS", ["https://aleph.im/", "https://ethereum.org/en/", "https://ipfs.io/"])
    result, failures = await first_success(urls, socket.AF_UNSPEC)
    if result is None:
        return 503, {"result": False, "failures": failures}
    return 200, result


def messages():
    h = os.environ.get("DIAG_MESSAGE_HASH", DEFAULT_MESSAGE)
    status, body = guest_api("GET", "/api/v0/messages.json?hashes=" + urllib.parse.quote(h))
    if status != 200 or not isinstance(body, dict) or not body.get("messages"):
        return 503, {"result": False, "failures": [{"host": "guest api", "reason": f"status {status}"}]}
    return 200, {"Messages": body}


def get_a_message():
    h = os.environ.get("DIAG_MESSAGE_HASH", DEFAULT_MESSAGE)
    status, body = guest_api("GET", "/api/v0/messages/" + urllib.parse.quote(h))
    if status != 200 or not isinstance(body, dict):
        return 503, {"result": False, "failures": [{"host": "guest api", "reason": f"status {status}"}]}
    message = body.get("message", body)
    if not isinstance(message, dict) or not message.get("item_hash"):
        return 503, {"result": False, "reason": "no item_hash in the answer"}
    return 200, message


def cache(parts):
    # /cache/set/{key}/{value}, /cache/get/{key}, /cache/remove/{key}, /cache/keys
    if parts[:1] == ["keys"]:
        status, body = guest_api("GET", "/cache/?pattern=*")
    elif parts[:1] == ["set"] and len(parts) == 3:
        status, body = guest_api("PUT", "/cache/" + urllib.parse.quote(parts[1]), parts[2].encode())
    elif parts[:1] == ["get"] and len(parts) == 2:
        # The cache answers the value's bytes, not JSON.
        status, body = guest_api("GET", "/cache/" + urllib.parse.quote(parts[1]), raw=True)
    elif parts[:1] == ["remove"] and len(parts) == 2:
        status, body = guest_api("DELETE", "/cache/" + urllib.parse.quote(parts[1]))
    else:
        return 404, {"error": "not found"}
    return status, body


def increment():
    directory = os.environ.get("DIAG_STATE_DIR", "/var/lib/example")
    path = os.path.join(directory, "storage.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        data = {"counter": 0}
    data["counter"] = int(data.get("counter", 0)) + 1
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 200, data


class CustomError(Exception):
    pass


async def route(method, path):
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if method == "GET":
        if not parts:
            return index()
        if parts == ["lifespan"]:
            return 200, {"Lifespan": lifespan_done}
        if parts == ["events"]:
            return 200, events
        if parts == ["environ"]:
            return 200, dict(os.environ)
        if parts == ["dns"]:
            return await asyncio.to_thread(dns)
        if parts == ["ip", "4"]:
            return await connect(socket.AF_INET, "DIAG_IPV4_URLS", ["https://9.9.9.9", "https://94.140.14.14"])
        if parts == ["ip", "6"]:
            return await connect(socket.AF_INET6, "DIAG_IPV6_URLS", ["https://[2620:fe::fe]", "https://[2606:4700:4700::1111]"])
        if parts == ["internet"]:
            return await internet()
        if parts == ["messages"]:
            return await asyncio.to_thread(messages)
        if parts == ["get_a_message"]:
            return await asyncio.to_thread(get_a_message)
        if parts[:1] == ["cache"]:
            return await asyncio.to_thread(cache, parts[1:])
        if parts == ["state", "increment"]:
            return await asyncio.to_thread(increment)
        if parts == ["raise"]:
            raise CustomError("Whoops")
        if parts == ["crash"]:
            os._exit(1)
    return 404, {"error": "not found"}


async def app(scope, receive, send):
    global lifespan_done
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                lifespan_done = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "aleph.message":
        message = await receive()
        events.append(json.loads(message["body"]))
        del events[:-100]
        return
    if scope["type"] != "http":
        return
    try:
        status, body = await route(scope["method"], scope["path"])
        payload, ctype = json.dumps(body).encode(), b"application/json"
    except Exception:  # noqa: BLE001 - the error is the answer, as the reference's init gives it
        status, payload, ctype = 500, traceback.format_exc().encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
    await send({"type": "http.response.body", "body": payload})
