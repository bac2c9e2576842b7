"""The playground page's two routes: its static files, and a face check for the photos a user drops in.

- ``GET /playground/<name>`` (and ``HEAD``) serves the files of ``serving/static/playground/``: plain
  HTML/CSS/JS, no build step. The folder is read once, when the server starts, into a table keyed by
  file name; a request path is only ever a key into that table, never joined to a filesystem path,
  so nothing outside the folder (``..``, encoded slashes, symlinks, files added later) can be
  reached, and no method writes. Answers carry a Content-Security-Policy that allows only this
  origin (the page loads no CDN or other network asset, and the browser enforces it).
- ``POST /playground/faces`` ``{"image": base64, "role": "reference" | "driving"}`` runs the
  server's own face check on one photo (the same image limits, decoding, detector and
  ``face.min_face_size`` rule a predict request goes through, on the same encode thread and under
  the same admission gate and timeout), so the page can show the detected face, or refuse the
  photo with the server's own reason, before a generation is asked for. Generation itself goes
  through the ordinary v1/v2 predict routes, as any client's does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from serving.errors import ServingError, bad_request, overloaded, timed_out
from serving.images import decode_image, encode_png

STATIC_DIR = Path(__file__).parent / "static" / "playground"
PREFIX = "/playground"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CROP_PX = 96  # side of the face thumbnail the face check returns
ROLES = ("reference", "driving")


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static(folder: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """The servable files of ``folder`` (flat: regular files with a plain name and a known type),
    read once. Symlinks are left out, so the table holds only what the package itself ships."""
    table: dict[str, StaticFile] = {}
    for path in sorted(folder.iterdir()):
        kind = CONTENT_TYPES.get(path.suffix)
        if kind and _NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            body = path.read_bytes()
            table[path.name] = StaticFile(body, kind, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    if "index.html" not in table:
        raise FileNotFoundError(f"{folder}: the playground's index.html is missing from the package")
    return table


def face_check(pipe: Any, image: np.ndarray, role: str) -> dict[str, Any]:
    """The face a predict request would use from ``image`` (its largest face of at least
    ``face.min_face_size`` px, the rule the pipeline applies to reference and driving photos alike)
    -> its box and a thumbnail of the crop the model sees; a photo without one raises ``no_face``."""
    from PIL import Image

    from model.face_analysis.face import FaceAnalysisError, face_crop_box, pick_face

    faces = pipe.analyzer().detect(image)
    try:
        face = pick_face(faces, who="image", min_size=pipe.face_params.min_face_size)
    except FaceAnalysisError as err:
        raise bad_request("no_face", str(err).removeprefix("image: "), "image") from None
    left, top, right, bottom = face_crop_box(face.bbox, image.shape[:2])
    crop = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right])).resize((CROP_PX, CROP_PX))
    h, w = image.shape[:2]
    return {
        "role": role, "image_size": [w, h], "faces_found": len(faces),
        "face": {"box": [round(float(v), 1) for v in face.bbox], "crop": [left, top, right, bottom],
                 "score": round(float(face.score), 4)},
        "thumbnail": encode_png(crop),
    }


def parse_face_request(body: bytes) -> tuple[str, str]:
    """The face check's JSON body -> (base64 image, role); every problem is a 400 naming the field."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise bad_request("invalid_json", "the body is not valid JSON", "body") from None
    if not isinstance(data, dict):
        raise bad_request("invalid_field", f"expected a JSON object, got {type(data).__name__}", "body")
    extra = sorted(set(data) - {"image", "role"})
    if extra:
        raise bad_request("unknown_field", "unknown field; allowed fields: image, role", extra[0])
    if "image" not in data:
        raise bad_request("missing_field", "required field is missing", "image")
    role = data.get("role", "reference")
    if role not in ROLES:
        raise bad_request("invalid_field", f"must be one of {', '.join(ROLES)}", "role")
    return data["image"], role


class Playground:
    """Handlers for the two routes, bound to the served model (looked up per request, so the routes
    exist while the model loads and answer 503 until it is ready, like predict)."""

    def __init__(self, dataplane: Any, model_name: str, static: dict[str, StaticFile] | None = None) -> None:
        self.dataplane = dataplane
        self.model_name = model_name
        self.static = load_static() if static is None else static

    async def page(self, request: Request) -> Response:
        if request.url.path == PREFIX:  # relative asset URLs in the page need the trailing slash
            return RedirectResponse(PREFIX + "/", status_code=308)
        name = request.path_params.get("name") or "index.html"
        item = self.static.get(name)  # the only use of the request path: a key into the table
        if item is None:
            raise HTTPException(404, f"{PREFIX}/{name[:100]}: no such playground file")
        headers = {**SECURITY_HEADERS, "ETag": item.etag}
        if request.headers.get("if-none-match") == item.etag:
            return Response(status_code=304, headers=headers)
        return Response(item.body, media_type=item.content_type, headers=headers)

    async def faces(self, request: Request) -> JSONResponse:
        model = self.dataplane.model_registry.get_model(self.model_name)
        serve = model.serve
        if not model.ready:
            raise ServingError(503, "not_ready", "the model is still loading",
                               headers={"Retry-After": str(serve.retry_after_s)})
        text, role = parse_face_request(await request.body())
        if not model.gate.try_acquire(1):  # the same admission bound as predict: one slot per check
            raise overloaded(model.gate.capacity, serve.retry_after_s)
        try:
            async with asyncio.timeout(serve.request_timeout_s):
                return JSONResponse(await self._check(model, text, role))
        except TimeoutError:
            raise timed_out(serve.request_timeout_s) from None
        finally:
            model.gate.release(1)

    @staticmethod
    async def _check(model: Any, text: str, role: str) -> dict[str, Any]:

        lim = model.limits
        image = await asyncio.to_thread(decode_image, text, "image", lim.max_image_bytes, lim.max_image_pixels,
                                        lim.image_formats)
        return await model.on_encode_thread(face_check, image, role)


def add_routes(app: Any, dataplane: Any, model_name: str) -> Playground:
    """Register the playground's routes on KServe's FastAPI app (GET/HEAD for files, POST for the check)."""
    pg = Playground(dataplane, model_name)
    app.add_route(PREFIX, pg.page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(PREFIX + "/", pg.page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(PREFIX + "/faces", pg.faces, methods=["POST"], include_in_schema=False)
    app.add_route(PREFIX + "/{name}", pg.page, methods=["GET", "HEAD"], include_in_schema=False)
    return pg


__all__ = ["Playground", "StaticFile", "add_routes", "face_check", "load_static", "parse_face_request", "STATIC_DIR"]
