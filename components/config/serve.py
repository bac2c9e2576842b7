"""Model server section."""

from __future__ import annotations

from pydantic import Field

from model.config import StrictModel


class ServeParams(StrictModel):
    model_name: str = "dynamicid"
    model_uri: str = Field("runs/reconfigure/export", description="models:/name@alias, a checkpoint dir, or /mnt/models")
    host: str = "127.0.0.1"
    http_port: int = 8080
    max_batch_size: int = Field(4, ge=1)
    batch_window_ms: int = Field(20, ge=0)
    max_queue: int = Field(16, ge=1, description="in-flight plus queued requests before 503")
    request_timeout_s: float = Field(120.0, gt=0)
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 100
    max_side: int = 1024
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    default_steps: int = 30
    default_guidance: float = 5.0
