"""KServe's ModelServer, with what a diffusion predictor needs on top.

- Binds ``serve.host`` (KServe's REST server always binds 0.0.0.0; the embedded default must stay
  on 127.0.0.1).
- Starts listening before the model is loaded: liveness answers during a long load, and server
  readiness (``/v2/health/ready``, KServe answers true unconditionally) follows the models'
  readiness, so the kubelet's readiness probe gates traffic until load + warm-up are done.
- Request bodies over ``serve.max_body_bytes`` get 413 before they are read (Content-Length) or as
  soon as the stream passes the limit (chunked), before JSON parsing.
- ServingError answers: status, ``{"error", "reason", "field"}`` and headers (Retry-After on 503).
  Every other error answer has the same shape (unparseable bodies, v2 bodies that do not match
  the protocol, unknown paths and models): a client always gets JSON naming the problem, never a
  FastAPI ``detail`` list that echoes its own input back, and hostile input never becomes a 500 or
  a logged traceback (only genuine server faults do, answered without internals).
- Only the documented routes: KServe's model-repository routes (``/v2/repository/models/<name>/load``
  and ``/unload``, which would let any client unload the model or load one by name), the
  ``:explain`` route (no explainer) and the ``/versions/<v>/`` routes (not supported, 501) are removed.
- The playground page (serving.playground): read-only ``GET /playground/`` from the package's static
  folder, and ``POST /playground/faces``, the server's own face check; both behind the same body
  limit, and the page generates through the ordinary predict routes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.server import RESTServer

from serving.errors import ServingError, bad_request, too_large
from serving.metrics import ServingMetrics
from serving.schema import field_path
from serving.timing import PhaseTimingMiddleware

log = logging.getLogger(__name__)


class DecodeError(ServingError):
    """A body KServe's decoder cannot parse: raised before the predictor, so counted by the handler."""


class ModelsReadyDataPlane(DataPlane):
    """Server readiness = every registered model is ready (KServe's answers true always, which is
    only right when models load before the server starts)."""

    async def ready(self) -> bool:
        models = list(self.model_registry.get_models().values())
        return bool(models) and all([await m.healthy() for m in models])

    def decode(self, body: Any, headers: dict[str, str] | None, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
        """KServe's decoder, made total: it is a pure function of the client's bytes, so anything it
        raises (a KeyError on a v2 binary body without ``inputs``, a ValueError on a non-numeric
        ``inference-header-content-length``...) is the client's error, answered 400, not a 500."""
        length = (headers or {}).get(INFERENCE_CONTENT_LENGTH_HEADER)
        if length is not None and isinstance(body, (bytes, bytearray)):
            if not re.fullmatch(r"[0-9]{1,18}", length) or int(length) > len(body):  # ASCII digits only
                raise DecodeError(400, "invalid_body", f"must be the byte length of the JSON part, 0..{len(body)}, "
                                  f"got {_short(length)!r}", INFERENCE_CONTENT_LENGTH_HEADER)
        try:
            return super().decode(body, headers, *args, **kwargs)
        except (ServingError, InvalidInput):
            raise
        except Exception as err:  # noqa: BLE001 - see the docstring
            raise DecodeError(400, "invalid_body", f"cannot decode the request ({type(err).__name__}: "
                              f"{_short(str(err))})", "body") from None


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def validation_error(err: RequestValidationError) -> ServingError:
    """FastAPI's 422 for a v2 body that is not an InferenceRequest -> our 400. The route's body is
    ``Union[InferenceRequest, bytes]``: the errors against the InferenceRequest branch are the
    useful ones (the bytes branch only says "not bytes")."""
    problems = list(err.errors())
    if any(p.get("type") == "json_invalid" for p in problems):
        return bad_request("invalid_json", "the body is not valid JSON", "body")
    useful = [p for p in problems if "InferenceRequest" in tuple(p.get("loc", ()))] or problems
    if not useful:
        return bad_request("invalid_body", "the body does not match the v2 inference request", "body")
    p = useful[0]
    loc = tuple(p.get("loc", ()))
    loc = loc[loc.index("InferenceRequest") + 1:] if "InferenceRequest" in loc else loc[1:]
    field = field_path(loc) or "body"
    reason = "missing_field" if p.get("type") == "missing" else "invalid_field"
    more = f" (and {len(useful) - 1} more)" if len(useful) > 1 else ""
    return bad_request(reason, f"{_short(str(p.get('msg', 'invalid')))}{more}", field)


_REMOVED_ROUTES = re.compile(r"^/v2/repository(/|$)|/versions/|:explain$")


class RouteFilterMiddleware:
    """Answers 404 for KServe routes this server does not offer (see the module docstring) before
    routing; a middleware because FastAPI keeps included routers behind a private structure."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _REMOVED_ROUTES.search(scope["path"]):
            body = {"error": f"{_short(scope['path'])}: not offered by this server", "reason": "not_found",
                    "field": None}
            response = JSONResponse(body, status_code=404)
            await send({"type": "http.response.start", "status": 404, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        await self.app(scope, receive, send)


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
                 playground_model: str | None = None, server_timing: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_timing = server_timing
        self.config.host = host
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.playground_model = playground_model

    def _register_endpoints(self, app: FastAPI) -> None:
        super()._register_endpoints(app)
        if self.playground_model is not None:
            from serving.playground import add_routes

            add_routes(app, self.dataplane, self.playground_model)

    def _add_middlewares(self, app: FastAPI) -> None:
        super()._add_middlewares(app)
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.max_body_bytes)
        app.add_middleware(RouteFilterMiddleware)
        # last added = outermost: a request's phases start before the body limit and routing
        app.add_middleware(PhaseTimingMiddleware, observe=self.metrics.phases, header=self.server_timing)

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        metrics, retry_after = self.metrics, str(self.retry_after_s)

        def answer(err: ServingError, count: bool = True) -> JSONResponse:
            if count and err.status != 503:  # 503s are counted where they are raised
                metrics.error(err.reason, err.status)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

        async def on_serving_error(_: Request, err: ServingError) -> JSONResponse:
            return answer(err, count=False)  # the predictor counted it (or the decoder: below)

        async def on_decode_error(_: Request, err: ServingError) -> JSONResponse:
            return answer(err)

        async def on_body_too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
            return answer(too_large("body_too_large", err.detail))

        async def on_invalid_input(_: Request, err: InvalidInput) -> JSONResponse:  # kserve's body decoder
            text = str(err)
            reason = "invalid_json" if text.startswith("Unrecognized request format") else "invalid_body"
            return answer(bad_request(reason, _short(text), "body"))

        async def on_request_validation(_: Request, err: RequestValidationError) -> JSONResponse:
            return answer(validation_error(err))

        async def on_http_error(_: Request, err: HTTPException) -> JSONResponse:  # routing: 404, 405
            reasons = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
            reason = reasons.get(err.status_code, "http_error")
            body = {"error": str(err.detail), "reason": reason, "field": None}
            return JSONResponse(body, status_code=err.status_code, headers=err.headers)

        async def on_model_not_found(_: Request, err: ModelNotFound) -> JSONResponse:
            body = {"error": f"model_name: {_short(str(err))}", "reason": "model_not_found", "field": "model_name"}
            return JSONResponse(body, status_code=404)

        async def on_not_ready(_: Request, err: Exception) -> JSONResponse:
            body = {"error": str(err), "reason": "not_ready", "field": None}
            return JSONResponse(body, status_code=503, headers={"Retry-After": retry_after})

        async def on_internal(_: Request, err: Exception) -> JSONResponse:
            log.error("internal error answering a request", exc_info=err)
            metrics.error("internal", 500)
            body = {"error": "internal server error (logged by the server)", "reason": "internal", "field": None}
            return JSONResponse(body, status_code=500)

        app.add_exception_handler(ServingError, on_serving_error)
        app.add_exception_handler(DecodeError, on_decode_error)
        app.add_exception_handler(BodyTooLarge, on_body_too_large)
        app.add_exception_handler(InvalidInput, on_invalid_input)
        app.add_exception_handler(RequestValidationError, on_request_validation)
        app.add_exception_handler(HTTPException, on_http_error)
        app.add_exception_handler(ModelNotFound, on_model_not_found)
        app.add_exception_handler(ModelNotReady, on_not_ready)
        app.add_exception_handler(ServerNotReady, on_not_ready)
        app.add_exception_handler(Exception, on_internal)


class DynamicIDModelServer(ModelServer):
    def __init__(self, host: str, http_port: int, max_body_bytes: int, metrics: ServingMetrics,
                 retry_after_s: int = 2, grace_period: int = 30, playground: bool = True,
                 server_timing: bool = False) -> None:
        super().__init__(http_port=http_port, enable_grpc=False, workers=1, grace_period=grace_period)
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.playground = playground
        self.server_timing = server_timing
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
            playground_model=models[0].name if models and self.playground else None,
            server_timing=self.server_timing,
        )
        self.servers.append(self._rest_server.start())
        self.servers.extend(m.start_engine() for m in models if m.engine)
        self.setup_event_loop()
        self.register_signal_handler()
        log.info("serving on http://%s:%d (ready once the model is loaded and warmed up)", self.host, self.http_port)
        if self.playground:
            log.info("playground page: http://%s:%d/playground/", self.host, self.http_port)
        asyncio.run(self._serve())


def serve(params, model_uri: str | None = None, trace_log: bool = False, pipeline_factory=None) -> None:
    """Run the model server until SIGINT/SIGTERM (``dynamicid serve``). ``trace_log``: keep KServe's
    two timing log lines per HTTP request (health checks included). ``pipeline_factory``: build the
    pipeline in code instead of loading ``model_uri`` (the HTTP benchmark's SD1.5-size random weights)."""
    from serving.predictor import DynamicIDModel

    s = params.serve
    metrics = ServingMetrics(s.model_name, s.max_batch_size)
    model = DynamicIDModel(params, model_uri=model_uri, metrics=metrics, pipeline_factory=pipeline_factory)
    server = DynamicIDModelServer(s.host, s.http_port, s.max_body_bytes, metrics, retry_after_s=s.retry_after_s,
                                  playground=s.playground, server_timing=s.server_timing)
    if not trace_log:  # after the server's constructor, which configures KServe's logging
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])


__all__ = ["DynamicIDModelServer", "ModelsReadyDataPlane", "DecodeError", "validation_error", "RouteFilterMiddleware",
           "BodyLimitMiddleware", "DynamicIDRESTServer", "serve"]
