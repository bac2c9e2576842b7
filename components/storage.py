"""Object-store access (any S3-compatible endpoint) with retries, and s3:// -> local cache.

Credentials come only from the standard AWS chain (env, profile, IRSA); endpoint and
region may come from params. Transient errors (connection resets, 5xx, throttling) are
retried with exponential backoff by botocore's "standard" retry mode.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A persistent object-store failure, after retries; never includes credentials."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client(storage=None):
    """A boto3 S3 client for the configured endpoint, with standard-mode retries."""
    import boto3
    from botocore.config import Config

    endpoint = getattr(storage, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
    region = getattr(storage, "region", None) or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    attempts = getattr(storage, "max_attempts", 8)
    cfg = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=cfg)


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def _safe_join(root: Path, rel: str) -> Path:
    """Join a remote key below root; a key that would escape root (.., absolute) is refused."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise StorageError(f"object key {rel!r} escapes the download root")
    return target


def download_prefix(uri: str, dest: Path, storage=None) -> Path:
    """Download every object under an s3:// prefix into dest (atomic: temp dir, then rename)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client(storage)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        keys = list_keys(client, bucket, prefix)
        if not keys:
            raise StorageError(f"{uri}: no objects under this prefix")
        for key in keys:
            target = _safe_join(tmp, key[len(prefix):])
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except (BotoCoreError, ClientError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"{uri}: download failed after retries: {type(err).__name__}: {err}") from None
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def resolve_local(uri: str | os.PathLike, cache_dir: str | os.PathLike = "~/.cache/dynamicid", storage=None) -> Path:
    """Local path for a local path or s3:// URI (downloaded once into cache_dir, keyed by URI)."""
    if not is_s3(uri):
        return Path(uri).expanduser()
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
    try:
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local).as_posix()]))
                client.upload_file(str(path), bucket, key)
    except (BotoCoreError, ClientError) as err:
        raise StorageError(f"upload to {uri} failed after retries: {type(err).__name__}: {err}") from None
