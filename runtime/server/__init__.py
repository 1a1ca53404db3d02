"""`python -m runtime.server`: an AUTOMATIC1111-compatible txt2img HTTP API on ONNX Runtime.

Needs the `server` extra (FastAPI + uvicorn); like the rest of the runtime it never imports torch.
Modules: `config` (settings, limits), `schemas` (request/response bodies), `mapping` (A1111 fields ->
library requests), `jobs` (queue and worker thread), `routes` (endpoints), `auth` and `body_limit`
(middleware), `app` (the assembled ASGI app), `__main__` (command line). See docs/server.md.
"""
