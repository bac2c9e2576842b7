"""Object-store access (any S3-compatible endpoint) with retries, and s3:// -> local cache.

Credentials come only from the standard AWS chain (env, profile, IRSA); endpoint, region,
retries and timeouts may come from params (``storage``). Transient errors (connection resets,
timeouts, 5xx, SlowDown/throttling) are retried by botocore itself ("standard" or "adaptive"
retry mode: exponential backoff with jitter, ``storage.max_attempts`` attempts per request, a
retry quota per client); streamed downloads that break mid-body are retried by s3transfer.
No retry loop is written here.

Paths: object keys and s3:// URIs come from outside (buckets, params, requests), so every key is
joined below its destination only after checking that it cannot leave it (``..``, absolute keys,
symlinks), and URIs with an invalid bucket or ``.``/``..`` segments are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# S3 bucket naming rules (3-63 chars, lower-case letters, digits, '.', '-'; alphanumeric at both
# ends); '_' is accepted for buckets made before those rules (and by MinIO/Ceph).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


class StorageError(RuntimeError):
    """A persistent object-store failure, after retries; never includes credentials (botocore's
    messages quote the endpoint URL, userinfo included, so the message is redacted here)."""

    def __init__(self, message: object = "", *args: object) -> None:
        from components.core.redact import redact_text

        super().__init__(redact_text(str(message)), *args)


class StorageUriError(StorageError, ValueError):
    """An s3:// URI that is malformed or could address something outside its prefix."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket/prefix``, refusing what cannot be a plain prefix.

    Refused: another scheme, an empty or invalid bucket (``s3:///x``, ``s3://user@host:1/x``),
    query/fragment parts, and ``.``/``..`` path segments (``s3://b/data/../secrets``), which S3
    would take literally but a local mirror of the prefix would resolve.
    """
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3":
        raise StorageUriError(f"not an s3:// URI: {uri}")
    if not parsed.netloc or not _BUCKET.match(parsed.netloc) or ".." in parsed.netloc:
        raise StorageUriError(f"{uri}: invalid bucket name {parsed.netloc!r} (expected s3://bucket/prefix)")
    if parsed.query or parsed.fragment or parsed.params:
        raise StorageUriError(f"{uri}: an s3:// URI takes no query, fragment or parameters")
    prefix = parsed.path.lstrip("/")
    if any(seg in (".", "..") for seg in prefix.split("/")):
        raise StorageUriError(f"{uri}: '.' and '..' segments are not allowed in an s3:// prefix")
    return parsed.netloc, prefix


def s3_client(storage=None):
    """A boto3 S3 client for the configured endpoint; retries and timeouts from ``storage``."""
    import boto3
    from botocore.config import Config

    endpoint = getattr(storage, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
    region = getattr(storage, "region", None) or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    cfg = Config(
        # total_max_attempts counts the first try, like AWS_MAX_ATTEMPTS ("max_attempts" here would
        # count retries only).
        retries={"total_max_attempts": getattr(storage, "max_attempts", 8),
                 "mode": getattr(storage, "retry_mode", "standard")},
        connect_timeout=getattr(storage, "connect_timeout_s", 10.0),
        read_timeout=getattr(storage, "read_timeout_s", 60.0),
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=cfg)


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def read_object(client, bucket: str, key: str) -> bytes:
    """One object's bytes. Through s3transfer (download_fileobj), not a bare GetObject: botocore
    retries a request until its headers arrive, but a body that breaks off mid-stream (reset,
    truncated response) is only retried by s3transfer."""
    import io

    from boto3.s3.transfer import TransferConfig

    buf = io.BytesIO()
    client.download_fileobj(bucket, key, buf, Config=TransferConfig(use_threads=False))
    return buf.getvalue()


def _safe_join(root: Path, rel: str) -> Path:
    """Join a remote key below root; a key that would escape root (``..``, absolute, through a
    symlink) is refused. Both sides are resolved, so a root that is itself reached through a
    symlink (a linked cache directory) still works."""
    if not rel or rel.startswith("/") or "\x00" in rel:
        raise StorageError(f"object key {rel!r} escapes the download root")
    base = root.resolve()
    target = (base / rel).resolve()
    if target == base or not target.is_relative_to(base):
        raise StorageError(f"object key {rel!r} escapes the download root")
    return target


def _fresh_dir(path: Path) -> None:
    """An empty real directory at ``path`` (a symlink left there is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def download_prefix(uri: str, dest: Path, storage=None) -> Path:
    """Download every object under an s3:// prefix into dest (atomic: temp dir, then rename).

    Every key is checked before anything is written; one unsafe key refuses the whole prefix
    (a partial mirror that silently lacks files would be worse). "Directory" marker objects
    (keys ending in '/') are skipped.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client(storage)
    tmp = dest.with_name(dest.name + ".partial")
    _fresh_dir(tmp)
    try:
        keys = [k for k in list_keys(client, bucket, prefix) if not k.endswith("/")]
        if not keys:
            raise StorageError(f"{uri}: no objects under this prefix")
        targets = [(key, _safe_join(tmp, key[len(prefix):])) for key in keys]
        for key, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except (BotoCoreError, ClientError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"{uri}: download failed after retries: {type(err).__name__}: {err}") from None
    except StorageError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"{uri}: {err}") from None
    except OSError as err:  # e.g. both "a" and "a/b" exist as keys
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"{uri}: cannot mirror the prefix locally: {err}") from None
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def resolve_local(uri: str | os.PathLike, cache_dir: str | os.PathLike = "~/.cache/dynamicid", storage=None) -> Path:
    """Local path for a local path or s3:// URI (downloaded once into cache_dir, keyed by URI)."""
    if not is_s3(uri):
        return Path(uri).expanduser()
    split_s3(str(uri))  # validate before anything touches the cache
    key = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    dest = Path(cache_dir).expanduser() / "s3" / key
    if not dest.exists():
        log.info("downloading %s into %s", uri, dest)
        download_prefix(str(uri), dest, storage)
    return dest


def upload_dir(local: Path, uri: str, storage=None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    client = s3_client(storage)
    root = Path(local)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    try:
        for path in files:  # checked before the first upload: a refused tree uploads nothing
            _safe_join(root, path.relative_to(root).as_posix())  # a symlink out of the tree is refused
        for path in files:
            key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(root).as_posix()]))
            client.upload_file(str(path), bucket, key)
    except StorageError as err:
        raise StorageError(f"upload of {local} to {uri} refused: {err}") from None
    except (BotoCoreError, ClientError) as err:
        raise StorageError(f"upload to {uri} failed after retries: {type(err).__name__}: {err}") from None


__all__ = ["StorageError", "StorageUriError", "download_prefix", "is_s3", "list_keys", "read_object", "resolve_local",
           "s3_client", "split_s3", "upload_dir"]
