"""Keep credentials out of everything a run leaves behind: logs, MLflow params, error messages.

Credentials reach a process three ways: environment variables (AWS_*, MLFLOW_TRACKING_TOKEN,
KF_PIPELINES_TOKEN...), the userinfo of a URI (``https://user:pass@host``) and HTTP headers that
libraries log at debug level (botocore logs every request with its ``Authorization`` header, which
carries the access key id). Redaction happens where text leaves the process: the tracking code
passes params through :func:`redact_params`, and the CLI installs :func:`install`, which redacts
every log record (whatever logger and handler it goes to) and uncaught tracebacks, and prints its
own error messages through :func:`redact_text`.

Only this module decides what looks like a secret, so the tracking code, the CLI and the check
that keeps credentials out of pod specs (components/deploy/settings.py) share one definition.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

MASK = "***"
# Words that make a name (env var, params key, header) secret-bearing. Whole words only, so that
# ``num_id_tokens`` or ``TOKENIZERS_PARALLELISM`` are not taken for credentials.
SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
                          "apikey", "auth"})
# Params keys that name a Secret object or its keys, not hold a credential.
NOT_SECRET_PARAMS = frozenset({"pipeline.s3_secret", "pipeline.s3_keys", "pipeline.s3_optional_keys"})
# Env values shorter than this are not treated as secrets by value ("1", "true", a region...).
MIN_SECRET_LEN = 8

# scheme://user:password@  or  scheme://token@  (userinfo of any URI-like text).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s'\"<>]+)@")
# Header values as libraries print them: 'Authorization': b'AWS4-HMAC-SHA256 Credential=...'
_HEADER = re.compile(
    r"(?P<name>\b(?:authorization|proxy-authorization|x-amz-security-token|cookie|x-api-key)['\"]?\s*[:=]\s*"
    r"b?['\"]?)(?P<value>[^'\"\n}]+)",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    """Does an env var / params key / header name look like it holds a credential?"""
    words = re.split(r"[^a-z0-9]+", name.lower())
    return any(w in SECRET_WORDS for w in words)


def uri_has_credentials(text: str) -> bool:
    """A URI with a password in its userinfo (``scheme://user:pass@host``)."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return bool(parts.scheme and parts.netloc and parts.password)


def known_secrets(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Values of the secret-named environment variables (long enough to be credentials)."""
    env = os.environ if environ is None else environ
    return frozenset(v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URI userinfo, credential headers and the given secret values masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _HEADER.sub(lambda m: f"{m['name']}{MASK}", text)
    for value in sorted(set(secrets), key=len, reverse=True):  # longest first: no partial leftovers
        if value:
            text = text.replace(value, MASK)
    return text


def redact_params(flat: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Flattened params (dotted keys) fit for MLflow: secret-named keys masked, text redacted."""
    secrets = frozenset(secrets)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        leaf = key.rsplit(".", 1)[-1]
        if key not in NOT_SECRET_PARAMS and is_secret_name(leaf) and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = redact_text(value, secrets)
        else:
            out[key] = value
    return out


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and its traceback text) with :func:`redact_text`; never drops it."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = frozenset(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: keep the raw text, still redacted
            message = str(record.msg)
        record.msg, record.args = redact_text(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"),
                                          self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


class _RedactingRecordFactory:
    """Applies a RedactingFilter as records are made, so that loggers with their own handlers and
    ``propagate = False`` (MLflow's) are covered as well as the root handlers."""

    def __init__(self, base, filter_: RedactingFilter):
        self.base, self.filter = base, filter_

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.base(*args, **kwargs)
        self.filter.filter(record)
        return record


def _excepthook(secrets: frozenset[str]):
    def hook(exc_type, exc, tb) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(redact_text(text, secrets))
    hook.redacting = True  # type: ignore[attr-defined]
    return hook


def install(environ: Mapping[str, str] | None = None) -> RedactingFilter:
    """Redact every log record, captured warning and uncaught traceback of this process.

    Idempotent: calling it again (the CLI called in-process several times) re-reads the secret
    environment values instead of stacking another layer.
    """
    flt = RedactingFilter(known_secrets(environ))
    current = logging.getLogRecordFactory()
    base = current.base if isinstance(current, _RedactingRecordFactory) else current
    logging.setLogRecordFactory(_RedactingRecordFactory(base, flt))
    logging.captureWarnings(True)  # warnings become records of "py.warnings", so they are redacted too
    if sys.excepthook is sys.__excepthook__ or getattr(sys.excepthook, "redacting", False):
        sys.excepthook = _excepthook(flt.secrets)
    return flt


__all__ = ["MASK", "is_secret_name", "uri_has_credentials", "known_secrets", "redact_text", "redact_params",
           "RedactingFilter", "install"]
