"""``dynamicid serve`` (the KServe model server) and ``dynamicid infer`` (its HTTP client)."""

from __future__ import annotations

import argparse
import json
import logging

from components.generate.args import load_landmarks, nth_value, parse_bbox, person_scales


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="run the KServe model server (v1 + v2 protocols) on serve.host:serve.http_port",
        description="Load the model named by --model-uri (default serve.model_uri): models:/name@alias or "
        "models:/name/version from the MLflow registry, s3://..., or a checkpoint directory (KServe mounts "
        "storageUri at /mnt/models). The server answers liveness at once and readiness after load and warm-up. "
        "Endpoints: POST /v1/models/<name>:predict, POST /v2/models/<name>/infer, GET /v2/health/{live,ready}, "
        "GET /v2/models/<name>, GET /metrics, and the playground page at GET /playground/. Stop with Ctrl-C.",
    )
    s.add_argument("--model-uri", default=None, help="default: serve.model_uri from params")
    s.add_argument("--host", default=None, help="bind address (default: serve.host)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.http_port)")
    s.add_argument("--schema", action="store_true",
                   help="print the JSON Schema of requests and responses for the configured limits, and exit")
    s.set_defaults(func=run_serve)

    i = sub.add_parser(
        "infer",
        help="call a running model server and write the generated image",
        description="Send --prompt and one --id-image per person to a model server started with `dynamicid serve` "
        "and write the returned PNG (+ .json metadata). The i-th --bbox, --expression, --driving-image, "
        "--landmarks and --person-id-scale belong to the i-th --id-image ('-' skips one). Waits up to --wait "
        "seconds for the model to be ready.",
    )
    i.add_argument("--url", default=None, help="server base URL (default: http://serve.host:serve.http_port)")
    i.add_argument("--model-name", default=None, help="default: serve.model_name")
    i.add_argument("--protocol", choices=["v1", "v2"], default="v1", help="inference protocol (default: v1)")
    i.add_argument("--prompt", required=True)
    i.add_argument("--negative-prompt", default=None)
    i.add_argument("--id-image", action="append", required=True, help="reference photo of one person (repeatable)")
    i.add_argument("--bbox", action="append", default=[], help="y0,x0,y1,x1 in [0,1] for the i-th person, or -")
    i.add_argument("--expression", action="append", default=[], help="target expression/pose for the i-th person, or -")
    i.add_argument("--driving-image", action="append", default=[],
                   help="photo whose face's pose and expression the i-th person takes (anyone's), or -")
    i.add_argument("--landmarks", action="append", default=[],
                   help="JSON file: target landmarks of the i-th person, [[x, y], ...] in pixels of its --id-image "
                   "(the face analyzer's layout: 68 dlib / 106 insightface points), or -")
    i.add_argument("--steps", type=int, default=None, help="default: the server's serve.default_steps")
    i.add_argument("--guidance", type=float, default=None)
    i.add_argument("--id-scale", type=float, default=None, help="the image's identity scale (every person's default)")
    i.add_argument("--person-id-scale", action="append", default=[],
                   help="identity scale of the i-th person (0 leaves them out), or - for --id-scale")
    i.add_argument("--height", type=int, default=None)
    i.add_argument("--width", type=int, default=None)
    i.add_argument("--seed", type=int, default=None, help="default: random (written to the .json)")
    i.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the model to become ready (default: 120)")
    i.add_argument("--http-timeout", type=float, default=None, help="default: serve.request_timeout_s + 30")
    i.add_argument("--out", default="out.png", help="output PNG; metadata goes next to it as .json (default: out.png)")
    i.set_defaults(func=run_infer)


def run_serve(args: argparse.Namespace, params) -> int:
    from components.core.errors import UserError

    params = params.model_copy(deep=True)
    try:
        if args.host is not None:
            params.serve.host = args.host
        if args.port is not None:
            params.serve.http_port = args.port
    except ValueError as err:
        raise UserError(f"serve: {err}") from None
    if args.schema:
        from serving.schema import Limits, RequestSchema

        print(json.dumps(RequestSchema(Limits.from_params(params)).json_schema(), indent=2))
        return 0
    logging.getLogger("serving").setLevel(logging.INFO)
    from model.checkpoint import CheckpointError
    from serving.model_store import ModelSourceError, resolve_model_dir
    from serving.server import serve

    try:
        # Resolved (and, for models:/ or s3://, downloaded) before listening: a wrong URI fails here
        # with a clear message instead of after the server has started.
        checkpoint = resolve_model_dir(params, args.model_uri)
        serve(params, model_uri=str(checkpoint), trace_log=bool(args.verbose))
    except (ModelSourceError, CheckpointError) as err:
        raise UserError(str(err)) from None
    except OSError as err:  # e.g. an unreadable model directory (a taken port: uvicorn logs it and exits 1)
        raise UserError(f"cannot serve on {params.serve.host}:{params.serve.http_port}: {err}") from None
    return 0


def run_infer(args: argparse.Namespace, params) -> int:
    from components.core.errors import UserError
    from serving.client import ClientError, build_instance, predict, wait_ready, write_prediction

    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    n = len(args.id_image)
    for name in ("bbox", "expression", "driving_image", "landmarks", "person_id_scale"):
        if len(getattr(args, name)) > n:
            raise UserError(f"more --{name.replace('_', '-')} values than --id-image values")
    s = params.serve
    url = (args.url or f"http://{s.host}:{s.http_port}").rstrip("/")
    model = args.model_name or s.model_name
    try:
        bboxes = [parse_bbox(b) if (b := nth_value(args.bbox, k)) else None for k in range(n)]
        landmarks = [load_landmarks(f) if (f := nth_value(args.landmarks, k)) else None for k in range(n)]
        instance = build_instance(
            args.prompt, args.id_image, bboxes=bboxes, expressions=[nth_value(args.expression, k) for k in range(n)],
            driving_images=[nth_value(args.driving_image, k) for k in range(n)], landmarks=landmarks,
            id_scales=person_scales(args.person_id_scale, n),
            negative_prompt=args.negative_prompt,
            seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance, id_scale=args.id_scale,
            height=args.height, width=args.width,
        )
        if args.wait > 0:
            wait_ready(url, model, args.wait)
        prediction = predict(url, model, instance, protocol=args.protocol,
                             timeout_s=args.http_timeout or s.request_timeout_s + 30)
    except (ClientError, argparse.ArgumentTypeError) as err:
        raise UserError(str(err)) from None
    png, meta = write_prediction(prediction, args.out)
    print(f"wrote {png} (seed {prediction['seed']}); metadata {meta}")
    return 0
