"""The playground page (serving/playground.py, serving/static/playground/) against the real server:
`dynamicid serve` on 127.0.0.1 (tiny profile, a fresh checkpoint), its two routes over plain HTTP,
and the page itself in Debian's headless Chromium driven by Selenium, the way a person uses it.

Set DYNAMICID_PLAYGROUND_SCREENSHOTS=docs/images to write the screenshots docs/serving.md shows.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.playground import STATIC_DIR, load_static
from tests.services import serve_process

pytestmark = pytest.mark.slow
SERVE = {  # small limits, so each is cheap to hit; one torch thread (2 shared cores)
    "serve.max_queue": 4, "serve.max_batch_size": 2, "serve.batch_window_ms": 50, "serve.max_steps": 8,
    "serve.default_steps": 2, "serve.max_side": 128, "serve.max_image_bytes": 200_000,
    "serve.max_image_pixels": 1_000_000, "serve.max_body_bytes": 1_000_000, "serve.request_timeout_s": 90,
    "serve.cpu_threads": 1,
}
SCREENSHOTS = os.environ.get("DYNAMICID_PLAYGROUND_SCREENSHOTS")


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


LOADING: dict[str, object] = {}  # what the routes answered while the model was still loading


@pytest.fixture(scope="module")
def server(init_ckpt, tiny_params, tmp_path_factory) -> str:
    def while_loading(url: str) -> None:
        LOADING["page"] = httpx.get(url + "/playground/", timeout=5).status_code
        early = httpx.post(url + "/playground/faces", json={"image": ""}, timeout=5)
        LOADING["faces"] = (early.status_code, early.json()["reason"], early.headers.get("retry-after"))

    log = tmp_path_factory.mktemp("playground-log") / "server.log"
    sets = {"storage.cache_dir": tiny_params.storage.cache_dir, **SERVE}
    with serve_process(init_ckpt, sets, log, on_live=while_loading) as (_, url):
        yield url


def test_page_is_there_while_the_model_loads_and_the_check_waits_for_it(server):
    assert LOADING == {"page": 200, "faces": (503, "not_ready", "2")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Test-bed photos (the synthetic renderer, seed 0): two people, a third person smiling with the
    head turned (a driving photo), and a gradient with no face."""
    from components.synth.samples import render_sample

    out = tmp_path_factory.mktemp("playground-photos")
    shots = {"alice.png": (0, 0), "bob.png": (1, 0), "driver.png": (2, 1)}
    for name, (identity, image) in shots.items():
        (out / name).write_bytes(png(render_sample(0, identity, image, 128)[0]))
    ramp = np.linspace(40, 220, 96, dtype=np.uint8)
    (out / "faceless.png").write_bytes(png(np.stack([np.tile(ramp, (96, 1))] * 3, axis=-1)))
    return {name.removesuffix(".png"): out / name for name in [*shots, "faceless.png"]}


def raw_get(url: str, path: str, method: str = "GET") -> http.client.HTTPResponse:
    """A request with the path exactly as given (httpx would normalise ``..`` away before sending)."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    conn.request(method, path)
    res = conn.getresponse()
    res.body = res.read()
    conn.close()
    return res


# ------------------------------------------------------------------------------ the static route
def test_static_table_holds_only_plain_files_of_its_folder(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / "notes.py").write_text("secret = 1")           # not a served type
    (tmp_path / ".hidden.js").write_text("1")                   # not a plain name
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_text("1")                 # not flat
    (tmp_path / "link.js").symlink_to(Path(__file__).resolve())  # points out of the folder
    assert sorted(load_static(tmp_path)) == ["app.js", "index.html"]


def test_page_files_are_served_read_only_and_nothing_else(server):
    first = httpx.get(server + "/playground")
    assert first.status_code == 308 and first.headers["location"].endswith("/playground/")
    page = httpx.get(server + "/playground/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for name in load_static():
        r = httpx.get(f"{server}/playground/{name}")
        assert r.status_code == 200 and r.content == (STATIC_DIR / name).read_bytes(), name
        again = httpx.get(f"{server}/playground/{name}", headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304
    head = raw_get(server, "/playground/playground.js", "HEAD")
    assert head.status == 200 and head.body == b""
    # no asset from anywhere but this origin: no absolute URL in any served file
    for name, item in load_static().items():
        assert not re.search(rb"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", item.body, re.I), name
    for path in ("/playground/../pyproject.toml", "/playground/..%2f..%2fpyproject.toml", "/playground/%2e%2e",
                 "/playground/playground.py", "/playground/..%5cplayground.py", "/playground/.%2fplayground.js",
                 "/playground/static/playground/index.html", "/playground/index.html%00.js"):
        r = raw_get(server, path)
        assert r.status == 404, (path, r.status, r.body[:200])
        assert b"secret" not in r.body and b"[build-system]" not in r.body
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = raw_get(server, "/playground/index.html", method)
        assert r.status == 405, (method, r.status)


# ------------------------------------------------------------------------------ the face check
def test_face_check_shows_the_face_and_refuses_as_predict_does(server, photos):
    ok = httpx.post(server + "/playground/faces", json={"image": b64(photos["alice"].read_bytes())}, timeout=60)
    assert ok.status_code == 200, ok.text
    face = ok.json()
    assert face["role"] == "reference" and face["image_size"] == [128, 128] and face["faces_found"] == 1
    x0, y0, x1, y1 = face["face"]["box"]
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    assert Image.open(io.BytesIO(base64.b64decode(face["thumbnail"]))).size == (96, 96)

    faceless = b64(photos["faceless"].read_bytes())
    refused = httpx.post(server + "/playground/faces", json={"image": faceless, "role": "driving"}, timeout=60)
    predict = httpx.post(server + "/v1/models/dynamicid:predict", timeout=60, json={"instances": [
        {"prompt": "a person", "num_inference_steps": 1, "identities": [{"image": faceless}]}]})
    assert refused.status_code == predict.status_code == 400
    assert refused.json()["reason"] == predict.json()["reason"] == "no_face"
    assert refused.json()["field"] == "image"
    assert refused.json()["error"].split(": ", 1)[1] == predict.json()["error"].split(": ", 1)[1]  # same reason


@pytest.mark.parametrize("body, status, reason", [
    ({"image": "file:///etc/passwd"}, 400, "uri_not_allowed"),
    ({"image": "not base64!"}, 400, "invalid_base64"),
    ({"image": b64(b"hello world " * 10)}, 400, "not_an_image"),
    ({"image": "A" * 300_000}, 413, "image_too_large"),
    ({"image": "", "role": "judge"}, 400, "invalid_field"),
    ({"image": "", "bbox": [0, 0, 1, 1]}, 400, "unknown_field"),
    ({}, 400, "missing_field"),
])
def test_face_check_applies_the_request_limits(server, body, status, reason):
    r = httpx.post(server + "/playground/faces", json=body, timeout=30)
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text


def test_face_check_bounds_body_and_pixels(server):
    big = httpx.post(server + "/playground/faces", content=b"x" * 1_200_000, timeout=30,
                     headers={"content-type": "application/json"})
    assert (big.status_code, big.json()["reason"]) == (413, "body_too_large")
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000)).save(bomb, format="PNG")  # 4 Mpx in a few kB: refused from its header
    r = httpx.post(server + "/playground/faces", json={"image": b64(bomb.getvalue())}, timeout=30)
    assert (r.status_code, r.json()["reason"]) == (413, "too_many_pixels")
    assert httpx.get(server + "/playground/faces").status_code == 404  # not a file


# ------------------------------------------------------------------------------ the page, in a browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_bin, ("the browser test needs Debian's chromium and chromium-driver: run `make browser` "
                                     "as root, or apt-get install -y chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def drag(driver, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag on the canvas between two points given as (x, y) fractions of its size."""
    from selenium.webdriver import ActionChains

    w, h = canvas.size["width"], canvas.size["height"]
    at = [(round((fx - 0.5) * w), round((fy - 0.5) * h)) for fx, fy in (start, end)]  # offsets from the centre
    (ActionChains(driver).move_to_element_with_offset(canvas, *at[0]).click_and_hold()
     .move_by_offset((at[1][0] - at[0][0]) // 2, (at[1][1] - at[0][1]) // 2)
     .move_to_element_with_offset(canvas, *at[1]).release().perform())


def shot(driver, name: str) -> None:
    """The whole page as a PNG under $DYNAMICID_PLAYGROUND_SCREENSHOTS (Chromium's own capture)."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        w, h = driver.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
        clip = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                                  "clip": clip})
        (Path(SCREENSHOTS) / name).write_bytes(base64.b64decode(data["data"]))


def test_page_generates_two_placed_people_and_shows_refusals(server, photos, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    d.get(server + "/playground/")
    wait.until(lambda _: d.find_element(By.ID, "status").text == "dynamicid: ready")

    # two reference photos in one pick: each checked by the server, its detected face shown
    d.find_element(By.ID, "photos").send_keys(f"{photos['alice']}\n{photos['bob']}")
    def shown_faces() -> int:  # thumbnails the server returned, decoded by the browser
        imgs = d.find_elements(By.CSS_SELECTOR, "#people .face")
        return sum(d.execute_script("return arguments[0].naturalWidth", e) == 96 for e in imgs)

    wait.until(lambda _: shown_faces() == 2)
    assert d.find_element(By.ID, "upload-error").is_displayed() is False

    # per person: a driving photo for the first, an expression and an identity scale for the second
    people = d.find_elements(By.CSS_SELECTOR, "#people .person")
    people[0].find_element(By.CSS_SELECTOR, "input.driving").send_keys(str(photos["driver"]))
    wait.until(lambda _: d.find_element(By.CSS_SELECTOR, "#people .person .driving-face").is_displayed())
    d.find_elements(By.CSS_SELECTOR, "#people .person input.expression")[1].send_keys("smiling")
    d.find_elements(By.CSS_SELECTOR, "#people .person input.id-scale")[1].send_keys("0.5")

    # the size first (the canvas takes its aspect), then two boxes dragged on the canvas
    for field, value in (("height", "64"), ("width", "96"), ("steps", "2"), ("seed", "1234")):
        d.find_element(By.ID, field).send_keys(value)
    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("two people at the beach")
    canvas = d.find_element(By.ID, "canvas")
    drag(d, canvas, (0.05, 0.1), (0.45, 0.9))
    drag(d, canvas, (0.55, 0.2), (0.95, 0.8))  # the first box moved the selection on to the second person
    drag(d, canvas, (0.75, 0.5), (0.70, 0.5))  # inside the second box: moves it 0.05 to the left
    boxes = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#people .box-text")]
    assert all(t.startswith("box [") for t in boxes), boxes

    d.find_element(By.ID, "generate").click()
    wait.until(lambda _: d.find_element(By.ID, "result-section").get_attribute("data-done") == "1")
    assert d.find_element(By.ID, "error").is_displayed() is False
    src = d.find_element(By.ID, "result-image").get_attribute("src")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert image.format == "PNG" and image.size == (96, 64)
    assert np.asarray(image.convert("RGB")).std() > 0  # decoded pixels, not an empty frame
    assert d.find_element(By.ID, "result-seed").text == "1234"
    assert d.find_element(By.ID, "result-size").text == "96 × 64 px"
    assert re.fullmatch(r"done in \d+\.\d s", d.find_element(By.ID, "elapsed").text)
    assert d.find_element(By.ID, "result-layout-kind").text == "boxes"
    layout = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#result-layout li")]
    regions = [[float(v) for v in re.findall(r"[0-9.]+", t.split("]")[0])] for t in layout[:2]]
    expected = [[0.1, 0.05, 0.9, 0.45], [0.2, 0.50, 0.8, 0.90]]  # [y0, x0, y1, x1]: where the boxes were dragged
    assert np.allclose(regions, expected, atol=0.02), layout
    assert all(t.endswith("edited") for t in layout[:2]), layout  # the driving photo and the expression
    shot(d, "playground.png")

    # the same request over v2 gives the same image
    Select(d.find_element(By.ID, "protocol")).select_by_value("v2")
    d.find_element(By.ID, "generate").click()
    wait.until(lambda _: d.find_element(By.ID, "result-section").get_attribute("data-done") == "1")
    again = d.find_element(By.ID, "result-image").get_attribute("src")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(again.split(",", 1)[1])))),
                          np.asarray(image))

    # a photo without a face: refused with the server's own words, nobody added
    d.find_element(By.ID, "photos").send_keys(str(photos["faceless"]))
    error = d.find_element(By.ID, "upload-error")
    wait.until(lambda _: error.is_displayed())
    told = httpx.post(server + "/playground/faces", json={"image": b64(photos["faceless"].read_bytes())}).json()
    assert error.text == f"HTTP 400 no_face faceless.png refused: {told['error']}", error.text
    assert len(d.find_elements(By.CSS_SELECTOR, "#people .person")) == 2
    shot(d, "playground-refused.png")

    # no boxes: a layout asked by name places the people, and the page says which it used
    d.find_element(By.ID, "clear-boxes").click()
    Select(d.find_element(By.ID, "layout")).select_by_value("strips")
    d.find_element(By.ID, "generate").click()
    wait.until(lambda _: d.find_element(By.ID, "result-section").get_attribute("data-done") == "1")
    assert d.find_element(By.ID, "result-layout-kind").text == "strips"
    layout = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#result-layout li")]
    assert layout[:2] == ["[0.000, 0.000, 1.000, 0.500] edited", "[0.000, 0.500, 1.000, 1.000] edited"], layout

    # an endpoint error, as the server wrote it: steps over serve.max_steps
    steps = d.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("50")
    d.find_element(By.ID, "generate").click()
    gen_error = d.find_element(By.ID, "error")
    wait.until(lambda _: gen_error.is_displayed())
    assert gen_error.text.startswith("HTTP 400 out_of_range parameters.num_inference_steps:"), gen_error.text
    steps.clear()
    steps.send_keys("2")
    person_scale = d.find_elements(By.CSS_SELECTOR, "#people .person input.id-scale")[1]
    person_scale.clear()
    person_scale.send_keys("9")  # over serve.max_id_scale: the person's own field is named
    d.find_element(By.ID, "generate").click()
    wait.until(lambda _: gen_error.text.startswith("HTTP 400 out_of_range parameters.identities[1].id_scale:"))

    logs = [e["message"] for e in d.get_log("browser")]
    assert not [m for m in logs if "Content Security Policy" in m or "Uncaught" in m], logs


@pytest.mark.parametrize("enabled", [True, False])
def test_the_playground_is_a_params_switch(tiny_params, enabled):
    """serve.playground (default true) decides whether the two routes exist (KServe's own are registered
    either way: test_serving_server.py runs the server)."""
    from fastapi import FastAPI
    from kserve.model_repository import ModelRepository

    from serving.server import DynamicIDRESTServer, ModelsReadyDataPlane

    assert tiny_params.serve.playground is True
    rest = DynamicIDRESTServer("kserve.model_server:app", ModelsReadyDataPlane(model_registry=ModelRepository()),
                               None, 0, host="127.0.0.1", max_body_bytes=1024, metrics=None, retry_after_s=2,
                               playground_model="dynamicid" if enabled else None)
    app = FastAPI()
    rest._register_endpoints(app)
    paths = {getattr(r, "path", "") for r in app.routes}
    playground = {p for p in paths if p.startswith("/playground")}
    routes = {"/playground", "/playground/", "/playground/faces", "/playground/{name}"}
    assert playground == (routes if enabled else set())
