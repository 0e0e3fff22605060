"""The tool server (FastAPI + a micro-batcher over one `SearchBackend`) and its HTTP client.

`tools.server.app`: `create_app`, `run_server` (`mmsearch serve`), `BackgroundServer`.
`tools.server.client`: `SearchClient`, the `SearchBackend` protocol over HTTP with replica failover.
Submodules are imported where used, so the client does not pull in FastAPI and uvicorn.
"""
