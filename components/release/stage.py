"""``dynamicid import-release``: read the research release's files (local or s3://), check them, write a checkpoint.

The conversion itself lives in ``model.release`` (no MLOps imports there); this stage adds what a command
needs: reading s3:// objects through the project's storage client, refusing to overwrite an existing output
unless asked, writing to s3:// through a local temp directory, and errors a user can act on. Every check runs
before anything is written, so a bad file leaves no output directory behind.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-release",
        help="import the research release's DynamicID weights (SAA.bin, IMR.bin, key_point_encoder.bin)",
        description="Turn the research release's weight files into a dynamicid checkpoint of the sd15 profile that "
        "generate, evaluate, register and serve load unchanged. Tensors are found by key pattern and shape, whatever "
        "top-level names hold them; fp16 and fp32 files both import. The checkpoint records the sources' sha256 and "
        "runs in the release compatibility mode by default (docs/release.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--saa", required=True, help="SAA.bin (face encoder + 32 attention processors): path or s3:// URI")
    p.add_argument("--imr", required=True, help="IMR.bin: path or s3:// URI")
    p.add_argument("--keypoint-encoder", default=None,
                   help="key_point_encoder.bin (default: next to --imr, 'IMR' replaced by 'key_point_encoder' "
                   "in the file name)")
    p.add_argument("--out", required=True, help="checkpoint directory to write: path or s3:// URI")
    p.add_argument("--profile", choices=("sd15", "tiny"), default="sd15",
                   help="target layout: sd15 (the released weights) or tiny (a scaled-down release layout, for tests)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.set_defaults(func=run_import)


def _read(uri: str, params) -> bytes:
    """The bytes of a local file or an s3:// object; a missing or unreadable one is a UserError naming it."""
    from components.core.errors import UserError
    from components.core.storage import StorageError, is_s3, read_object, s3_client, split_s3

    if is_s3(uri):
        try:
            bucket, key = split_s3(uri)
            return read_object(s3_client(params.storage), bucket, key)
        except StorageError as err:
            raise UserError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - botocore errors: a missing object, access denied, ...
            raise UserError(f"{uri}: cannot read it ({type(err).__name__}: {err})") from None
    path = Path(uri).expanduser()
    if not path.is_file():
        raise UserError(f"{uri}: no such file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"{uri}: cannot read it ({err})") from None


def _layout(profile: str, params):
    from model.dynamicid import EMBEDDING_DIMS
    from model.release.layout import ReleaseLayout

    if profile == "sd15":
        return ReleaseLayout.sd15(), 224
    backend = params.face.resolved_backend(profile)
    tiny = params.model.tiny
    return ReleaseLayout.scaled(profile, tiny, EMBEDDING_DIMS[backend], backend), tiny.face_crop_size


def run_import(args: argparse.Namespace, params) -> int:
    from components.core.errors import UserError
    from components.core.storage import StorageError, is_s3, upload_dir
    from model.release.convert import ReleaseSource, import_release, keypoint_sibling
    from model.release.reader import ReleaseImportError

    out_s3 = is_s3(args.out)
    out = Path(args.out).expanduser()
    if not out_s3 and out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
    try:
        kp_uri = args.keypoint_encoder or keypoint_sibling(args.imr)
    except ReleaseImportError as err:
        raise UserError(str(err)) from None
    sources = [ReleaseSource(uri, _read(uri, params)) for uri in (args.saa, args.imr, kp_uri)]
    layout, crop = _layout(args.profile, params)
    staging = Path(tempfile.mkdtemp(prefix="dynamicid-import-")) if out_s3 else None
    try:
        target = staging / "checkpoint" if staging else out
        try:
            path = import_release(*sources, target, layout=layout, face_crop_size=crop)
        except ReleaseImportError as err:
            raise UserError(f"nothing written: {err}") from None
        if staging:
            try:
                upload_dir(path, args.out, params.storage)
            except StorageError as err:
                raise UserError(str(err)) from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out}: the research release's weights as a dynamicid {layout.profile} checkpoint "
          "(compatibility mode: release)")
    for src in sources:
        print(f"  {src.uri}")
    print(f"try: dynamicid -S model.profile={layout.profile} generate --checkpoint {args.out} --prompt "
          "'a photo of a person' --id-image PHOTO --out out.png")
    return 0
