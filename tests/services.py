"""Real services for the registry tests, started on 127.0.0.1 and always stopped.

- ``moto_s3``: moto's S3-compatible server (``ThreadedMotoServer``) with one bucket;
- ``postgres``: a private PostgreSQL cluster (initdb + pg_ctl in a temp dir, own port, trust auth),
  run as the ``postgres`` user when the tests run as root (PostgreSQL refuses to run as root);
- ``mlflow_server``: ``mlflow server`` with a given backend store and an S3 artefact destination.

Plus ``write_face_dataset``: a prepared data set (components.core.shards format) of real faces from the
photos bundled with insightface, analysed with the real dlib models, so evaluation runs real
detection and recognition without any download.

Every start waits a bounded time and raises with the service's log tail when it does not come up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout_s: float, what: str, log: Path | None = None, proc: subprocess.Popen | None = None,
          poll_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(poll_s)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s\n{tail}")


# --------------------------------------------------------------------------- dynamicid serve


@contextlib.contextmanager
def serve_process(checkpoint: Path, sets: dict[str, object], log: Path, on_live=None,
                  timeout_s: float = 180) -> Iterator[tuple[subprocess.Popen, str]]:
    """`dynamicid serve` (params overrides ``sets``) on a free 127.0.0.1 port; yields (process, url)
    once ready. ``on_live(url)`` runs once the server listens, while the model may still be loading
    (the server answers liveness before readiness). Always stopped with SIGTERM, then SIGKILL."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]
    cmd = [sys.executable, "-m", "components.cli", *overrides, "serve", "--model-uri", str(checkpoint),
           "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            started = time.monotonic()
            _wait(lambda: httpx.get(f"{url}/v2/health/live", timeout=2).status_code == 200, timeout_s,
                  "dynamicid serve (live)", log, proc, poll_s=0.02)
            if on_live is not None:
                on_live(url)
            _wait(lambda: httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200,
                  timeout_s - (time.monotonic() - started), "dynamicid serve (ready)", log, proc, poll_s=0.1)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        from components.core.storage import list_keys

        return list_keys(self.client(), self.bucket, prefix)


@contextlib.contextmanager
def moto_s3(bucket: str = "dynamicid") -> Iterator[S3Server]:
    import logging

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # one access-log line per S3 request is noise in test output
    server.start()
    try:
        s3 = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket=bucket)
        _wait(lambda: s3.client().list_buckets() is not None, 20, "moto S3 server")
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()
        werkzeug.setLevel(level)


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path:
    """Directory of initdb/pg_ctl: pg_config --bindir, else Debian's /usr/lib/postgresql/<v>/bin."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; install them, e.g. "
                       "`apt-get install -y postgresql` (Debian/Ubuntu)")


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@dataclass
class Postgres:
    port: int
    database: str

    @property
    def uri(self) -> str:
        # psycopg2 named explicitly: SQLAlchemy 2.1 defaults postgresql:// to psycopg (3).
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                                 dbname=self.database)) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()


@contextlib.contextmanager
def postgres(database: str = "mlflow", timeout_s: float = 60) -> Iterator[Postgres]:
    import psycopg2

    bindir = postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="dynamicid-pg-"))
    data, log = root / "data", root / "postgres.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    port = free_port()
    started = False
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                     "-E", "UTF8", "--no-sync"]), check=True, capture_output=True, timeout=timeout_s)
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                                     "-w", "-t", str(int(timeout_s)), "start"]),
                       check=True, capture_output=True, timeout=timeout_s + 5)
        started = True
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=port, user="postgres",
                                                 dbname="postgres")) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{database}"')
        yield Postgres(port=port, database=database)
    except subprocess.CalledProcessError as err:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"PostgreSQL failed: {' '.join(err.cmd)}\n{err.stderr.decode()[-2000:]}\n{tail}") from None
    finally:
        if started:
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow tracking server


@dataclass
class MlflowServer:
    uri: str
    log: Path


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_destination: str, workdir: Path, env: dict[str, str] | None = None,
                  timeout_s: float = 90) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 (own process group, terminated on exit)."""
    port = free_port()
    log = workdir / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination, "--workers", "1"]
    penv = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=penv, cwd=workdir,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, timeout_s,
              "mlflow server", log, proc)
        yield MlflowServer(uri=uri, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


# --------------------------------------------------------------------------- prepared data of real faces


def face_rows(analyzer, photos: list[tuple[str, np.ndarray]], test_identities: set[str]) -> list[dict]:
    """Prepared rows (components.core.shards schema) for the largest face of each (identity, photo)."""
    from PIL import Image

    from components.core.shards import encode_png
    from model.landmarks import render_landmarks
    from model.motion import estimate_expression, face_prompt
    from model.pipeline import face_crop_box

    rows = []
    for identity, photo in photos:
        face = analyzer.detect(photo)[0]
        left, top, right, bottom = face_crop_box(face.bbox, photo.shape[:2], margin=0.6)
        side = right - left
        crop = np.ascontiguousarray(photo[top:bottom, left:right])
        face_crop = np.asarray(Image.fromarray(crop).resize((128, 128), Image.BICUBIC))
        pixels = np.asarray(Image.fromarray(crop).resize((64, 64), Image.BICUBIC))
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        box = [(y0 - top) / side, (x0 - left) / side, (y1 - top) / side, (x1 - left) / side]
        lm = (np.asarray(face.landmarks, np.float32) - np.array([left, top], np.float32)) / side
        lmk_img = render_landmarks(lm * side, (side, side), size=96)[0]
        yaw, pitch, roll = face.pose
        expression = estimate_expression(face.landmarks)
        png = encode_png(face_crop)
        rows.append({
            "key": hashlib.sha256(png).hexdigest(), "identity": identity, "image": f"{identity}/0000.png",
            "split": "test" if identity in test_identities else "train", "caption": "a photo of a person",
            "pixels": encode_png(pixels), "face_crop": png, "face_box": [min(max(v, 0.0), 1.0) for v in box],
            "embedding": face.embedding.astype(np.float32).tolist(), "landmarks": lm.reshape(-1).tolist(),
            "landmark_image": encode_png((lmk_img * 255).astype(np.uint8)), "yaw": float(yaw),
            "pitch": float(pitch), "roll": float(roll), "expression": expression,
            "face_prompt": face_prompt(expression, yaw, pitch),
        })
    return rows


def write_face_dataset(out_dir: Path, group_photo: Path, single_face_photo: Path, test_identities: int = 4) -> Path:
    """Seven real people (six from the group photo, one single portrait) as a prepared data set;
    the first ``test_identities`` of them (by name) form the test split."""
    from PIL import Image

    from components.core.shards import write_shards
    from model.face_analysis.backends import DlibFaceAnalyzer
    from model.pipeline import face_crop_box

    analyzer = DlibFaceAnalyzer()
    group = np.asarray(Image.open(group_photo).convert("RGB"))
    photos = []
    for i, face in enumerate(sorted(analyzer.detect(group), key=lambda f: float(f.bbox[0]))):
        left, top, right, bottom = face_crop_box(face.bbox, group.shape[:2], margin=0.8)
        photos.append((f"person_{i}", np.ascontiguousarray(group[top:bottom, left:right])))
    photos.append(("person_hanks", np.asarray(Image.open(single_face_photo).convert("RGB"))))
    names = sorted(p[0] for p in photos)
    rows = face_rows(analyzer, photos, set(names[:test_identities]))
    write_shards(out_dir, rows, shard_size=4)
    return out_dir
