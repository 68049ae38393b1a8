"""`flashgen serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the serving engine.

Needs the server extras: pip install 'flashgen[serve]' (fastapi, uvicorn, prometheus_client, llguidance).
"""
import logging
import signal

log = logging.getLogger("flashgen")


def serve(llm, config, host="127.0.0.1", port=8000, log_level="warning"):
    """Serve `llm` until SIGINT or SIGTERM, then shut down cleanly (in-flight requests are aborted)."""
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        raise ImportError(f"flashgen serve needs the server extras ({e.name} is missing): "
                          f"pip install fastapi uvicorn prometheus_client llguidance") from None
    app = build_app(llm, config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=5))
    # uvicorn re-raises the signal that stopped it once it has shut down, under the handlers it found: make
    # those no-ops so a stop by signal is a clean exit (status 0), not a KeyboardInterrupt or a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise RuntimeError(f"the server could not start on {host}:{port} (see the log above)")
    log.info("server stopped")
