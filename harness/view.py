"""`python -m harness.view OUT`: HELM's web UI over a harness output folder, every compression variant a model.

    python -m harness.view results/smoke/<run> [--port 8000]     # then open http://127.0.0.1:8000
    python -m harness.view results/smoke/<run> --export site/    # static site: python -m http.server -d site

It runs HELM's summarize step (harness.helm.summarize) and serves HELM's own frontend, which ships prebuilt in
the crfm-helm wheel (helm/benchmark/static_build), with HELM's server routes; only the bind differs: loopback
unless --host says otherwise, since results may not be public. Nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import errno
import sys
from importlib import resources
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser

DEFAULT_PORT = 8000


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m harness.view", description=__doc__.split("\n\n")[0])
    p.add_argument("output", metavar="OUT", help="the --output folder of a harness run")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: this machine only)")
    p.add_argument("--export", metavar="DIR", help="write the static site into DIR (new or empty) instead of serving")
    return p


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the frontend fetches many files at once; a closed tab must not hold the exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per file fetched would bury the URL
        pass


def bind(host: str, port: int) -> WSGIServer:
    """Bind before summarizing, so a busy port fails in one line before seconds of work."""
    try:
        return make_server(host, port, lambda environ, start: [], server_class=_Server, handler_class=_QuietHandler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} is in use; pass another --port (e.g. --port {port + 1})") from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}; pass another --host or --port") from None


def helm_app(benchmark_output: Path, release: str):
    """HELM's server app (bottle) configured for one summarized release on disk."""
    from helm.benchmark.server import app

    with resources.as_file(resources.files("helm.benchmark.static_build").joinpath("index.html")) as index:
        if not index.is_file():
            raise UserError("crfm-helm ships no prebuilt frontend (helm/benchmark/static_build/index.html); "
                            "reinstall crfm-helm from its wheel")
    app.config.update({"helm.staticpath": str(index.parent), "helm.project": "lite",
                       "helm.outputurl": "benchmark_output", "helm.outputpath": str(benchmark_output.resolve()),
                       "helm.cacheoutputpath": str(benchmark_output.resolve().parent / "cache"), "helm.suite": None,
                       "helm.release": release})
    return app


def check_export(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--export {folder} exists and is not an empty folder; pass a new folder")


def export(app, folder: Path) -> None:
    """HELM's own export: the frontend, its config.js and the summarized release, following our links."""
    from helm.benchmark.server import export_website

    check_export(folder)
    export_website(str(folder))


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; pass the --output folder of a harness run (results/<suite>/...)")
    if args.export:
        check_export(Path(args.export))
    server = None if args.export else bind(args.host, args.port)
    try:
        from harness.helm.summarize import summarize

        site = summarize(out)
        app = helm_app(site.benchmark_output, site.release)
        print(f"summarized {', '.join(site.suites)}: {len(site.models)} models ({', '.join(site.models)})",
              flush=True)
        if server is None:
            export(app, Path(args.export))
            print(f"exported to {args.export}; view it with: python -m http.server -d {args.export}", flush=True)
            return 0
        server.set_app(app)
        host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
        print(f"serving HELM's UI on http://{host}:{server.server_port} (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C is how a user stops serving, not an interruption of work
            print("stopped", flush=True)
    finally:
        if server is not None:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
