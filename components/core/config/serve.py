"""Model server section (``serve:`` in params.yaml), read by ``dynamicid serve`` and the KServe predictor.

Every request limit lives here so that one params change tightens or loosens the public API, and
the JSON Schema that ``dynamicid serve --schema`` prints always states the limits actually enforced.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import StrictModel


class ServeParams(StrictModel):
    model_name: str = Field("dynamicid", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                            description="name in the URL paths: /v1/models/<name>:predict, /v2/models/<name>/infer")
    fast_path: Literal["auto", "cuda_graphs", "compile", "eager", "off"] = Field(
        "auto", description="model/fast/ at load: auto = CUDA graphs per (size, ids) bucket on a GPU, eager on a CPU"
    )
    model_uri: str = Field(
        "runs/reconfigure/export",
        description="models:/name@alias or models:/name/version (MLflow registry), s3://..., a local checkpoint "
        "directory, or /mnt/models (filled by KServe's storage initializer from storageUri)",
    )
    host: str = Field("127.0.0.1", description="bind address; the cluster params (k8s/) set 0.0.0.0")
    http_port: int = Field(8080, ge=0, le=65535, description="0 = any free port")
    # batching and back-pressure
    max_batch_size: int = Field(4, ge=1, description="most requests denoised together in one UNet batch")
    batch_window_ms: int = Field(20, ge=0, description="how long the first request of a batch waits for company")
    max_queue: int = Field(16, ge=1, description="in-flight plus queued requests (images) before 503")
    retry_after_s: int = Field(2, ge=1, description="Retry-After header of a 503 answer")
    request_timeout_s: float = Field(120.0, gt=0, description="per-request limit, queueing included; then 504")
    warmup: bool = Field(True, description="one small generation before reporting ready")
    playground: bool = Field(True, description="serve the playground page at /playground/ (and its face check)")
    server_timing: bool = Field(False, description="add a Server-Timing header (per-phase milliseconds, "
                                "serving.timing) to predict answers; the phases are in /metrics either way")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads when serving on CPU; null = torch's default. Set it to "
        "the container's CPU limit: more threads than cores makes OpenMP spin and run many times slower",
    )
    # request limits, all checked before any image is decoded
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=64, description="per image, after base64 decoding")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="width x height, read from the image header")
    image_formats: list[Literal["PNG", "JPEG", "WEBP", "BMP"]] = Field(["PNG", "JPEG", "WEBP"], min_length=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_expression_chars: int = Field(300, ge=1)
    max_steps: int = Field(100, ge=1)
    min_side: int = Field(64, ge=8, description="smallest height/width in pixels (multiple of 8)")
    max_side: int = Field(1024, ge=8, description="largest height/width in pixels (multiple of 8)")
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_id_scale: float = Field(4.0, ge=0.0)
    default_steps: int = Field(30, ge=1)
    default_guidance: float = 5.0

    @model_validator(mode="after")
    def _consistent(self) -> "ServeParams":
        if self.min_side % 8 or self.max_side % 8:
            raise ValueError("min_side and max_side must be multiples of 8")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        if self.min_guidance > self.max_guidance:
            raise ValueError(f"min_guidance {self.min_guidance} > max_guidance {self.max_guidance}")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} outside 1..max_steps {self.max_steps}")
        if not self.min_guidance <= self.default_guidance <= self.max_guidance:
            raise ValueError(f"default_guidance {self.default_guidance} outside min_guidance..max_guidance")
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError(f"max_image_bytes {self.max_image_bytes} > max_body_bytes {self.max_body_bytes}")
        return self
