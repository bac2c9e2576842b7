"""``dynamicid evaluate`` and its metrics, on real faces (insightface's bundled photos, real dlib models),
a tiny random checkpoint, and a real local MLflow store."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from components.core.config import params_from_dict
from components.core.metric_catalogue import edit_target, metric_info
from components.evaluate.metrics import (
    ClipScorer,
    aggregate,
    assign_faces,
    clip_model_path,
    pose_error,
    region_box,
    similarity_matrix,
)
from tests.services import write_face_dataset

pytestmark = pytest.mark.usefixtures("module_cwd")  # MLflow writes ./mlruns; params.yaml is not ours


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, group_photo, single_face_photo):
    return write_face_dataset(tmp_path_factory.mktemp("prepared") / "prepared", group_photo, single_face_photo,
                              test_identities=4)


@pytest.fixture(scope="module")
def params(tiny_params, prepared, tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow")
    return params_from_dict({
        "storage": {"cache_dir": tiny_params.storage.cache_dir},
        "data": {"prepared": str(prepared)},
        "mlflow": {"tracking_uri": f"sqlite:///{store}/mlflow.db"},
        "evaluate": {"steps": 1, "num_identities": 3, "prompts": ["a photo of a person"], "seeds": [0],
                     "multi_prompts": ["a photo of {count} people"], "multi_id": [2, 3], "multi_groups": 1,
                     "batch_size": 4, "compare_champion": False},
    })


@pytest.fixture(scope="module")
def analyzer():
    from model.face_analysis.backends import DlibFaceAnalyzer

    return DlibFaceAnalyzer()


@pytest.fixture(scope="module")
def clip(params):
    return ClipScorer(clip_model_path(params))


# --------------------------------------------------------------------------- metric functions


def test_metric_catalogue_names_and_directions():
    assert metric_info("multi3.confusion_rate").direction == "lower"
    assert metric_info("single.id_similarity").direction == "higher"
    assert metric_info("edit.pose_error").direction == "lower"
    for bad in ("single.confusion_rate", "multi1.id_similarity", "edit.clip_t", "single", "x.id_similarity"):
        with pytest.raises(KeyError, match="unknown metric"):
            metric_info(bad)


def test_hungarian_assignment_is_the_best_matching_and_flags_confusion():
    rng = np.random.default_rng(0)
    for r, f in [(2, 2), (3, 3), (3, 2), (2, 4), (4, 4)]:
        sim = rng.uniform(-1, 1, size=(r, f))
        a = assign_faces(sim)
        best = max(sum(sim[i, p[i]] for i in range(r) if p[i] is not None)
                   for p in _assignments(r, f))
        assert a.similarity.sum() == pytest.approx(best)
        assert sum(x is not None for x in a.face) == min(r, f)
        for i, j in enumerate(a.face):
            if j is None:
                assert a.similarity[i] == 0 and a.confused[i] is None
            else:
                assert a.similarity[i] == sim[i, j]
                assert a.confused[i] == any(sim[k, j] > sim[i, j] for k in range(r) if k != i)
    # two faces of person 0: one must go to reference 1 and is then "confused"
    a = assign_faces(np.array([[0.9, 0.8], [0.35, 0.1]]))   # best total: ref 0 <- face 1, ref 1 <- face 0
    assert a.face == [1, 0] and a.confused == [False, True]
    empty = assign_faces(np.zeros((2, 0)))
    assert empty.face == [None, None] and empty.similarity.tolist() == [0, 0]


def _assignments(r: int, f: int):
    """Every injective partial map of references to faces (brute force for the test)."""
    for perm in itertools.permutations(list(range(f)) + [None] * r, r):
        used = [p for p in perm if p is not None]
        if len(used) == len(set(used)) and len(used) == min(r, f):
            yield perm


def test_similarity_matrix_is_cosine():
    a, b = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[4.0, 3.0]])
    np.testing.assert_allclose(similarity_matrix(a, b), [[24 / 25], [4 / 5]])
    assert similarity_matrix(a, np.zeros((0, 2))).shape == (2, 0)


def test_region_box_is_centred_square_inside_region():
    assert region_box((0, 0, 1, 0.5), (64, 64)) == (0, 16, 32, 48)
    assert region_box((0, 0.5, 1, 1), (64, 64)) == (32, 16, 64, 48)
    assert region_box((0, 0, 1, 1), (64, 64)) == (0, 0, 64, 64)
    left, top, right, bottom = region_box((0.0, 0.0, 1.0, 1 / 3), (96, 96))
    assert right - left == bottom - top == 32 and left == 0


def test_edit_targets_and_pose_error():
    t = edit_target("the face is turned to the left")
    assert t.pose_requested and t.expression is None and t.yaw < 0 and t.pitch == 0
    e = edit_target("the expression is happy")
    assert e.expression == "happy" and not e.pose_requested
    assert pose_error((-20.0, 4.0), (-35.0, 0.0)) == pytest.approx((15 + 4) / 2)
    with pytest.raises(ValueError):
        edit_target("make it nicer")


def test_bad_edit_and_multi_sizes_are_rejected_by_params():
    from components.core.config import ParamsError

    with pytest.raises(ParamsError, match="evaluate.edits"):
        params_from_dict({"evaluate": {"edits": ["make it nicer"]}})
    with pytest.raises(ParamsError, match="evaluate.multi_id"):
        params_from_dict({"evaluate": {"multi_id": [1]}})


# --------------------------------------------------------------------------- CLIP-T


def test_clip_t_is_the_cosine_of_clip_projections(params, clip):
    import torch
    from transformers import CLIPModel

    path = clip_model_path(params)
    assert path == clip_model_path(params)  # built once, then reused from the cache
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a photo of a person", "two people together", "a red hat"]
    got = clip.score(images, texts)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    px = clip.processor(images=images, return_tensors="pt")["pixel_values"]
    tok = clip.processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    want = torch.nn.functional.cosine_similarity(img, txt).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sd15_needs_a_real_clip(params):
    p = params.model_copy(deep=True)
    p.model.profile = "sd15"
    with pytest.raises(ValueError, match="evaluate.clip_model"):
        clip_model_path(p)


# --------------------------------------------------------------------------- scoring on real faces


def _crop(photo: np.ndarray, face, margin: float) -> np.ndarray:
    from model.pipeline import face_crop_box

    left, top, right, bottom = face_crop_box(face.bbox, photo.shape[:2], margin=margin)
    return np.ascontiguousarray(photo[top:bottom, left:right])


@pytest.fixture(scope="module")
def people(analyzer, group_photo):
    """Two real people as (reference crop, another crop of the same person)."""
    photo = np.asarray(Image.open(group_photo).convert("RGB"))
    faces = analyzer.detect(photo)[:2]
    return [(_crop(photo, f, 0.6), _crop(photo, f, 0.35)) for f in faces]


def test_scoring_real_faces_single_multi_edit_and_missed(people, analyzer, clip):
    from components.evaluate.evalset import EvalSet, Job, Reference
    from components.evaluate.generation import Generated
    from components.evaluate.scoring import FaceCache, score

    (ref_a, alt_a), (ref_b, alt_b) = people
    emb = {k: analyzer.detect(v)[0].embedding for k, v in {"a": ref_a, "b": ref_b}.items()}
    refs = [Reference("a", "ka", ref_a, emb["a"]), Reference("b", "kb", ref_b, emb["b"])]
    size = 192
    sq = lambda img: np.asarray(Image.fromarray(img).resize((size, size)))  # noqa: E731
    pair_swapped = np.concatenate([sq(alt_b), sq(alt_a)], axis=1)            # B left, A right
    pair_same = np.concatenate([sq(alt_a), sq(alt_a)], axis=1)               # A twice
    blank = np.full((size, size, 3), 128, np.uint8)
    jobs = [Job("single", (0,), "p", 0), Job("multi2", (0, 1), "q", 0), Job("multi2", (0, 1), "r", 0),
            Job("edit", (0,), "p", 0, "the face is turned to the left")]
    gens = [Generated(Image.fromarray(sq(alt_a)), [[0, 0, 1, 1]]),
            Generated(Image.fromarray(pair_swapped), [[0, 0, 1, 0.5], [0, 0.5, 1, 1]]),
            Generated(Image.fromarray(pair_same), [[0, 0, 1, 0.5], [0, 0.5, 1, 1]]),
            Generated(Image.fromarray(sq(alt_a)), [[0, 0, 1, 1]])]
    evalset = EvalSet(refs, jobs, {}, "h")
    baselines = {k: Image.fromarray(blank) for k in evalset.baselines()}
    rows = score(evalset, gens, baselines, FaceCache(analyzer), clip, "landmarks")

    def rows_of(job, variant):
        return [r for r in rows if r["job"] == job and r["variant"] == variant]

    # single: same person detected, similarity = cosine of the two embeddings; blank baseline = miss = 0
    a_face = analyzer.detect(sq(alt_a))[0]
    (single,) = rows_of(0, "id")
    assert single["detected"] and single["id_similarity"] == pytest.approx(
        float(a_face.embedding @ emb["a"]) / np.linalg.norm(a_face.embedding) / np.linalg.norm(emb["a"]))
    (base,) = rows_of(0, "baseline")
    assert base["detected"] is False and base["id_similarity"] == 0.0
    # region crop of the whole image: the recognizer on the full square, without detection
    want_region = analyzer.embed_aligned(sq(alt_a)) @ emb["a"]
    assert single["region_similarity"] == pytest.approx(float(want_region), abs=1e-6)

    # multi, swapped layout: Hungarian matches each reference to its own person, no confusion
    faces = analyzer.detect(pair_swapped)
    right = max(range(len(faces)), key=lambda k: faces[k].bbox[0])
    m = rows_of(1, "id")
    assert [r["identity"] for r in m] == ["a", "b"] and all(r["detected"] for r in m)
    assert m[0]["id_similarity"] == pytest.approx(float(faces[right].embedding @ emb["a"]), abs=1e-6)
    assert [r["confused"] for r in m] == [False, False]
    assert m[0]["id_similarity"] > 0.9 and m[1]["id_similarity"] > 0.9  # same person, dlib's scale
    # multi with the same person twice: the face given to B is closer to A -> confusion for B only
    assert [r["confused"] for r in rows_of(2, "id")] == [False, True]

    # edit: pose measured on the output against "turned to the left" (yaw -35, pitch 0)
    (ed,) = rows_of(3, "edit")
    yaw, pitch, _ = a_face.pose
    assert ed["pose_error"] == pytest.approx((abs(yaw + 35) + abs(pitch)) / 2, abs=1e-6)
    assert ed["target_yaw"] == -35.0 and ed["expression_agree"] is None  # no expression requested
    (un,) = rows_of(3, "unedited")
    assert un["pose_error"] == pytest.approx(ed["pose_error"])  # the same image here

    agg = aggregate(rows)
    ids = [r["id_similarity"] for r in rows if r["kind"] == "multi2" and r["variant"] == "id"]
    assert agg["multi2.id_similarity"] == pytest.approx(np.mean(ids), abs=1e-6)
    assert agg["multi2.confusion_rate"] == pytest.approx(0.25)
    assert agg["single.detection_failure_rate"] == 0 and agg["single.baseline_detection_failure_rate"] == 1
    assert agg["single.id_lift"] == pytest.approx(single["id_similarity"], abs=1e-6)
    assert agg["edit.pose_error_gain"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- evaluation set


def test_eval_set_is_fixed_and_its_hash_tracks_the_definition(params, analyzer):
    from components.core.shards import PreparedData
    from components.evaluate.evalset import build_eval_set

    a = build_eval_set(params, analyzer, clip_id="c")
    b = build_eval_set(params, analyzer, clip_id="c")
    assert a.hash == b.hash and [r.key for r in a.references] == [r.key for r in b.references]
    data = PreparedData(params.data.prepared)
    test_ids = sorted(data.identities("test"))
    assert [r.identity for r in a.references] == test_ids[:3]
    assert {r["identity"] for r in data.rows("train")}.isdisjoint(r.identity for r in a.references)
    kinds = [j.kind for j in a.jobs]
    assert kinds.count("single") == 3 and kinds.count("multi2") == 1 and kinds.count("multi3") == 1
    assert kinds.count("edit") == 3 * 2
    assert [j.refs for j in a.jobs if j.kind.startswith("multi")] == [(0, 1), (0, 1, 2)]
    assert [j.prompt for j in a.jobs if j.kind == "multi3"] == ["a photo of three people"]
    assert len(a.baselines()) == 3  # one per distinct (prompt, seed)
    other = params.model_copy(deep=True)
    other.evaluate.seeds = [1]
    assert build_eval_set(other, analyzer, clip_id="c").hash != a.hash
    assert build_eval_set(params, analyzer, clip_id="other-clip").hash != a.hash


def test_multi_id_larger_than_the_test_split_is_a_user_error(params, analyzer):
    from components.core.errors import UserError
    from components.evaluate.evalset import build_eval_set

    p = params.model_copy(deep=True)
    p.evaluate.multi_id = [4]
    with pytest.raises(UserError, match="evaluate.multi_id asks for 4"):
        build_eval_set(p, analyzer, clip_id="c")


# --------------------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def evaluation(params, tiny_params, tmp_path_factory):
    from components.cli import main
    from model.loading import init_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    ckpt = init_checkpoint(tiny_params.model, tiny_params.face, root / "ckpt", tiny_params.storage.cache_dir, seed=3)
    sets = ["-S", f"storage.cache_dir={params.storage.cache_dir}", "-S", f"data.prepared={params.data.prepared}",
            "-S", f"mlflow.tracking_uri={params.mlflow.tracking_uri}"]
    for key, value in params.evaluate.model_dump(mode="json").items():
        sets += ["-S", f"evaluate.{key}={json.dumps(value)}"]
    rc = main([*sets, "evaluate", "--checkpoint", str(ckpt), "--output", str(root / "out")])
    assert rc == 0
    return root / "out", ckpt


def _csv_mean(rows, kind, variant, column):
    vals = [float(r[column]) for r in rows if r["kind"] == kind and r["variant"] == variant and r[column] != ""]
    return float(np.mean(vals)) if vals else None


def test_evaluate_writes_metrics_rows_grids_and_report(evaluation, params):
    out, ckpt = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"single", "multi2", "multi3", "edit"}
    rows = list(csv.DictReader(open(out / "samples.csv")))
    # 3 single + 2 multi2 persons + 3 multi3 persons, each with ID on and off; 6 edits x (edited, unedited)
    assert len(rows) == 2 * (3 + 2 + 3) + 2 * 6
    for kind in ("single", "multi2", "multi3"):
        for leaf, variant, col in [("id_similarity", "id", "id_similarity"), ("clip_t", "id", "clip_t"),
                                   ("baseline_clip_t", "baseline", "clip_t"),
                                   ("region_similarity", "id", "region_similarity")]:
            assert metrics[kind][leaf] == pytest.approx(_csv_mean(rows, kind, variant, col), abs=2e-6), (kind, leaf)
        fail = np.mean([r["detected"] == "False" for r in rows if r["kind"] == kind and r["variant"] == "id"])
        assert metrics[kind]["detection_failure_rate"] == pytest.approx(fail)
    # every baseline with the same prompt and seed is the same image, so it has one CLIP-T
    base = {(r["prompt"], r["seed"]): r["clip_t"] for r in rows if r["variant"] == "baseline"}
    assert all(r["clip_t"] == base[(r["prompt"], r["seed"])] for r in rows if r["variant"] == "baseline")

    report = json.loads((out / "report.json").read_text())
    assert report["eval_set_hash"] == json.loads((out / "eval_set.json").read_text())["hash"]
    from components.core.registry import checkpoint_digest

    assert report["checkpoint_digest"] == checkpoint_digest(ckpt)
    assert report["counts"]["images"] == 3 + 1 + 1 + 6 and report["counts"]["baseline_images"] == 3
    for name in report["grids"]:
        assert (out / name).exists()
    single = Image.open(out / "grids" / "single-000.png")
    assert single.width == 96 * 3 and single.height == 16 + 3 * (96 + 28)
    assert Image.open(out / "grids" / "multi3-000.png").width == 96 * 5
    assert {r["grid"] for r in rows} == {p.split("/")[-1] for p in report["grids"]}


def test_evaluate_logs_one_mlflow_run(evaluation, params):
    from mlflow import MlflowClient

    out, _ = evaluation
    report = json.loads((out / "report.json").read_text())
    run = MlflowClient(params.mlflow.tracking_uri).get_run(report["mlflow"]["run_id"])
    from components.evaluate.metrics import flatten_metrics

    assert run.data.metrics == pytest.approx(flatten_metrics(json.loads((out / "metrics.json").read_text())))
    tags = run.data.tags
    assert tags["eval_set_hash"] == report["eval_set_hash"] and tags["checkpoint_digest"] == report["checkpoint_digest"]
    assert tags["data_version"].startswith("sha256:") and tags["params_hash"] == report["params_hash"]
    assert run.data.params["evaluate.steps"] == "1"
    names = {a.path for a in MlflowClient(params.mlflow.tracking_uri).list_artifacts(run.info.run_id)}
    assert {"metrics.json", "samples.csv", "report.json", "eval_set.json", "grids"} <= names
