"""``kvcl serve``: an OpenAI-compatible HTTP server over :class:`kvcl.scheduler.Scheduler`.

Layers: :mod:`kvcl.server.protocol` checks request bodies, :mod:`kvcl.server.engine` runs the one
engine loop (a thread stepping the scheduler), :mod:`kvcl.server.app` is the Starlette app.
Nothing here knows what is below the scheduler (onnxruntime, the device): ``kvcl serve`` in
:mod:`kvcl.server.cli` builds the scheduler from an exported model and hands it over.
Needs the ``serve`` extra (starlette, uvicorn).
"""

from .app import create_app
from .engine import EngineLoop
from .protocol import RequestError

__all__ = ["create_app", "EngineLoop", "RequestError"]
