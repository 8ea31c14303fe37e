"""`loop.py serve` (and `loop.py run --serve`): the live page's web app, its server and command line.

The app serves reporting/static/ and one JSON endpoint fed by reporting/live.py's LiveData (which reads
everything from disk and never writes). Bound to 127.0.0.1 by default, with Host headers checked (a web
page elsewhere cannot read it through DNS rebinding); another address needs --host and prints a warning:
there is no password.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import threading
from pathlib import Path

from reporting.live import LiveData, Refused

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "LOOPBACK_HOSTS", "STATIC", "make_app", "serve", "start_in_thread",
           "add_subparser", "add_run_options", "start_for_run", "host_warning", "LiveServer"]

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


# ---------------------------------------------------------------------------
# The web app
# ---------------------------------------------------------------------------

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _Headers:
    """ASGI middleware: a strict content policy (no script or style but the page's own files), no
    caching of the API, no referrer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope.get("path", "").startswith("/api/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", _CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def make_app(data: LiveData, allowed_hosts: list[str] | None = None):
    """The Starlette app: GET only; `allowed_hosts` checks the Host header (None: any)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def index(request):
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    def api_state(request):
        return JSONResponse(_finite(data.state()))

    def api_run(request):
        try:
            return JSONResponse(data.run_text(request.path_params["run"], request.path_params["kind"]))
        except Refused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    def not_found(request):
        return JSONResponse({"error": "no such page; the API is /api/state and /api/runs/<n>/diff|log"},
                            status_code=404)

    routes = [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/api/state", api_state, methods=["GET", "HEAD"]),
        Route("/api/runs/{run}/{kind}", api_run, methods=["GET", "HEAD"]),
        Route("/api/{rest:path}", not_found, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"]), Middleware(_Headers)]
    return Starlette(routes=routes, middleware=middleware)


def _finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def _url(host: str, port: int) -> str:
    h = host.strip("[]")
    return f"http://[{h}]:{port}/" if ":" in h else f"http://{h}:{port}/"


def host_warning(host: str, port: int) -> str | None:
    """The warning printed when the page is served on an address other machines can reach."""
    if _is_loopback(host):
        return None
    return (f"warning: serving on {host}: anyone who can reach this machine on port {port} can read the results, "
            f"diffs and logs (there is no password). To look from another machine, prefer an SSH tunnel to the "
            f"default address: ssh -L {port}:127.0.0.1:{port} <this machine>")


class LiveServer:
    """uvicorn serving the app on an already bound socket, in a daemon thread (`loop.py run --serve`)."""

    def __init__(self, data: LiveData, sock: socket.socket, host: str):
        import uvicorn

        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = _url(host, self.port)
        app = make_app(data, None if not _is_loopback(host) else list(LOOPBACK_HOSTS))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    server_header=False))
        self.thread = threading.Thread(target=self._run, name="live-page", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except Exception as e:  # noqa: BLE001 - the loop goes on without its page
            print(f"warning: the live page stopped: {e}", file=sys.stderr, flush=True)

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass


def start_in_thread(results: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **settings) -> LiveServer:
    """Serve the page of `results` from a background thread; raises OSError when the address is taken."""
    sock = _bind(host, port)
    return LiveServer(LiveData(results, **settings), sock, host).start()


def serve(results: str | Path = "results.tsv", others: list[str | Path] = (), host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT) -> int:
    """`loop.py serve`: serve until Ctrl-C. Prints the address (`serving on <url>`) first; exit code 1 with
    one sentence when the address cannot be bound."""
    import uvicorn

    data = LiveData(results, others)
    try:
        sock = _bind(host, port)
    except OSError as e:
        print(f"error: cannot listen on {host}:{port} ({e.strerror or e}); pick another with --port "
              "(0: any free port).", file=sys.stderr, flush=True)
        return 1
    warning = host_warning(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    url = _url(host, sock.getsockname()[1])
    if not data.results.exists():
        print(f"note: {data.results} does not exist yet; the page fills in when the loop writes it.", flush=True)
    print(f"serving on {url} (results: {data.results}); Ctrl-C stops", flush=True)
    app = make_app(data, None if not _is_loopback(host) else list(LOOPBACK_HOSTS))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           server_header=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_subparser(subparsers) -> None:
    """Register `serve` on loop.py's subparsers (`func` returns the exit code)."""
    p = subparsers.add_parser("serve", help="a live page of the results in the browser (read-only, local)")
    p.add_argument("paths", nargs="*", metavar="RESULTS",
                   help="results file (default ./results.tsv); more files (other machines) add the compare view")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; another prints a warning)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.set_defaults(func=lambda a: serve((a.paths or ["results.tsv"])[0], (a.paths or [])[1:], a.host, a.port))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """`loop.py run --serve [--serve-host H] [--serve-port P]`: the live page while the loop runs."""
    parser.add_argument("--serve", action="store_true",
                        help=f"serve the live page while the loop runs (http://{DEFAULT_HOST}:{DEFAULT_PORT}/)")
    parser.add_argument("--serve-host", default=DEFAULT_HOST,
                        help=f"... on this address (default {DEFAULT_HOST}; another prints a warning)")
    parser.add_argument("--serve-port", type=int, default=DEFAULT_PORT, help=f"... and port (default {DEFAULT_PORT})")


def start_for_run(args, results: Path, settings, console) -> LiveServer | None:
    """Start the page for `loop.py run --serve` (None without --serve). A taken port is one warning,
    not a reason to stop the loop."""
    if not getattr(args, "serve", False):
        return None
    warning = host_warning(args.serve_host, args.serve_port)
    if warning:
        console.event(warning)
    try:
        server = start_in_thread(results, args.serve_host, args.serve_port, min_noise=settings.min_noise,
                                 abort_z=settings.abort_z, abort_min_progress=settings.abort_min_progress,
                                 early_abort=settings.early_abort, alpha=settings.alpha, confirm=settings.confirm)
    except OSError as e:
        console.event(f"warning: no live page: cannot listen on {args.serve_host}:{args.serve_port} "
                      f"({e.strerror or e}); the loop goes on. Run `loop.py serve --port <another>` beside it.")
        return None
    console.event(f"live page: {server.url}")
    return server
