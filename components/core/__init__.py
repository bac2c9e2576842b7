"""Shared core of every stage: validated params, object storage, secret redaction, MLflow tracking, the
user-error type, the prepared-shard format and the one model-loading path.
"""
