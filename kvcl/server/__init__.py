"""``kvcl serve``: an OpenAI-compatible HTTP server over :class:`kvcl.scheduler.Scheduler`.

Layers: :mod:`kvcl.server.protocol` checks request bodies, ``kvcl.server.engine`` runs the one
engine loop (:class:`EngineLoop`, a thread stepping the scheduler), ``kvcl.server.app`` is the
Starlette app (:func:`create_app`). Nothing here knows what is below the scheduler (onnxruntime,
the device): ``kvcl serve`` in :mod:`kvcl.serve` builds the scheduler from an exported model and
hands it over.
Needs the ``serve`` extra (starlette, uvicorn).
"""

from .app import create_app
from .engine import EngineLoop
from .protocol import RequestError

__all__ = ["create_app", "EngineLoop", "RequestError"]
