"""KServe's ModelServer, with what a diffusion predictor needs on top.

- Binds ``serve.host`` (KServe's REST server always binds 0.0.0.0; the embedded default must stay
  on 127.0.0.1).
- Starts listening before the model is loaded: liveness answers during a long load, and server
  readiness (``/v2/health/ready``, KServe answers true unconditionally) follows the models'
  readiness, so the kubelet's readiness probe gates traffic until load + warm-up are done.
- Request bodies over ``serve.max_body_bytes`` get 413 before they are read (Content-Length) or as
  soon as the stream passes the limit (chunked), before JSON parsing.
- ServingError answers: status, ``{"error", "reason", "field"}`` and headers (Retry-After on 503).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import ModelNotReady, ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer

from serving.errors import ServingError, too_large
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class ModelsReadyDataPlane(DataPlane):
    """Server readiness = every registered model is ready (KServe's answers true always, which is
    only right when models load before the server starts)."""

    async def ready(self) -> bool:
        models = list(self.model_registry.get_models().values())
        return bool(models) and all([await m.healthy() for m in models])


class BodyTooLarge(HTTPException):
    """Raised from the request stream: an HTTPException, so FastAPI's body parsing passes it on
    unchanged instead of turning it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes (serve.max_body_bytes)")
        self.limit = limit


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, too_large("body_too_large", BodyTooLarge(self.max_bytes).detail))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Send, err: ServingError) -> None:
    response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class DynamicIDRESTServer(RESTServer):
    """KServe's REST server bound to ``host``, with the body limit, ServingError answers, and
    not-ready answers without a logged traceback (the readiness probe asks every few seconds while
    the model loads)."""

    def __init__(self, *args, host: str, max_body_bytes: int, metrics: ServingMetrics, retry_after_s: int,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = host
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    def _add_middlewares(self, app: FastAPI) -> None:
        super()._add_middlewares(app)
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.max_body_bytes)

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        metrics, retry_after = self.metrics, str(self.retry_after_s)

        async def on_serving_error(_: Request, err: ServingError) -> JSONResponse:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

        async def on_body_too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
            answer = too_large("body_too_large", err.detail)
            metrics.error(answer.reason, answer.status)
            return JSONResponse(answer.body(), status_code=answer.status)

        async def on_not_ready(_: Request, err: Exception) -> JSONResponse:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": retry_after})

        app.add_exception_handler(ServingError, on_serving_error)
        app.add_exception_handler(BodyTooLarge, on_body_too_large)
        app.add_exception_handler(ModelNotReady, on_not_ready)
        app.add_exception_handler(ServerNotReady, on_not_ready)


class DynamicIDModelServer(ModelServer):
    def __init__(self, host: str, http_port: int, max_body_bytes: int, metrics: ServingMetrics,
                 retry_after_s: int = 2, grace_period: int = 30) -> None:
        super().__init__(http_port=http_port, enable_grpc=False, workers=1, grace_period=grace_period)
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.dataplane = ModelsReadyDataPlane(model_registry=self.registered_models)

    def start(self, models: list) -> None:
        """Serve ``models`` now and load them in the background (``start_engine``)."""
        for model in models:
            self.register_model(model)
            model.enable_latency_logging = self.enable_latency_logging
        self._rest_server = DynamicIDRESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            host=self.host, max_body_bytes=self.max_body_bytes, metrics=self.metrics, retry_after_s=self.retry_after_s,
        )
        self.servers.append(self._rest_server.start())
        self.servers.extend(m.start_engine() for m in models if m.engine)
        self.setup_event_loop()
        self.register_signal_handler()
        log.info("serving on http://%s:%d (ready once the model is loaded and warmed up)", self.host, self.http_port)
        asyncio.run(self._serve())


def serve(params, model_uri: str | None = None, trace_log: bool = False) -> None:
    """Run the model server until SIGINT/SIGTERM (``dynamicid serve``). ``trace_log``: keep KServe's
    two timing log lines per HTTP request (health checks included)."""
    from serving.predictor import DynamicIDModel

    s = params.serve
    metrics = ServingMetrics(s.model_name, s.max_batch_size)
    model = DynamicIDModel(params, model_uri=model_uri, metrics=metrics)
    server = DynamicIDModelServer(s.host, s.http_port, s.max_body_bytes, metrics, retry_after_s=s.retry_after_s)
    if not trace_log:  # after the server's constructor, which configures KServe's logging
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])


__all__ = ["DynamicIDModelServer", "ModelsReadyDataPlane", "BodyLimitMiddleware", "DynamicIDRESTServer", "serve"]
