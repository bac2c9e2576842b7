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
from components.evaluate.estimators import LandmarkRule
from components.evaluate.metrics import (
    ClipScorer,
    aggregate,
    assign_faces,
    clip_model_path,
    pose_error,
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
                     "batch_size": 4, "motion_reader": "landmarks",  # real photos carry no pose/expression labels
                     "landmark_edits": False},  # one photo per person here: tests/test_motion_reader.py drives
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
    assert metric_info("single.id_lift_low") == metric_info("single.id_lift")  # an interval bound of the metric
    for bad in ("single.confusion_rate", "multi1.id_similarity", "edit.clip_t", "single", "x.id_similarity",
                "single.region_similarity", "single.nope_low"):
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
    """Three real people as (reference crop, another crop of the same person)."""
    photo = np.asarray(Image.open(group_photo).convert("RGB"))
    faces = sorted(analyzer.detect(photo), key=lambda f: float(f.bbox[0]))[:3]
    return [(_crop(photo, f, 0.6), _crop(photo, f, 0.35)) for f in faces]


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_scoring_known_images_single_control_multi_edit_and_missed(people, analyzer, clip):
    """Constructed generations whose answers are known: the reference photo itself pasted in (copy-paste), another
    photo of the right person, a blank image (missed face), a wrong person as the control, two people swapped,
    the same person twice, a person left out."""
    from components.evaluate.evalset import Driver, EvalSet, Job, Reference
    from components.evaluate.generation import Generated
    from components.evaluate.scoring import FaceCache, score

    size = 192
    sq = lambda img: np.asarray(Image.fromarray(img).resize((size, size)))  # noqa: E731
    (ref_a, alt_a), (ref_b, alt_b), (ref_c, alt_c) = [(sq(r), sq(o)) for r, o in people]
    emb = {k: analyzer.detect(v)[0].embedding for k, v in
           {"a": ref_a, "b": ref_b, "c": ref_c, "A": alt_a, "B": alt_b, "C": alt_c}.items()}
    refs = [Reference(k, "k" + k, img, emb[k], others=emb[k.upper()][None], other_keys=("o" + k,))
            for k, img in (("a", ref_a), ("b", ref_b), ("c", ref_c))]
    blank = np.full((size, size, 3), 128, np.uint8)
    pair = lambda x, y: np.concatenate([x, y], axis=1)  # noqa: E731
    whole, halves = [[0, 0, 1, 1]], [[0, 0, 1, 0.5], [0, 0.5, 1, 1]]
    cases = [  # (job, image)
        (Job("single", (0,), "p", 0), ref_a),                      # the reference photo pasted: copy-paste
        (Job("single", (1,), "p", 0), alt_b),                      # another photo of the right person
        (Job("single", (2,), "p", 0), blank),                      # no face
        (Job("shuffled", (1,), "p", 0, against=0), alt_b),         # b's photo given, measured against a
        (Job("shuffled", (2,), "p", 0, against=1), alt_c),
        (Job("shuffled", (0,), "p", 0, against=2), alt_a),
        (Job("multi2", (0, 1), "q", 0), pair(alt_b, alt_a)),       # B left, A right
        (Job("multi2", (0, 1), "r", 0), pair(alt_a, alt_a)),       # A twice
        (Job("multi2", (0, 1), "s", 0), pair(alt_a, blank)),       # B left out
        (Job("edit", (0,), "p", 0, "the face is turned to the left"), alt_a),
        (Job("drive", (0,), "p", 0, driver=0), alt_a),              # to b's photo, labelled happy, yaw -30
    ]
    drivers = [Driver("b", "kb2", alt_b, "happy", -30.0, 5.0)]
    evalset = EvalSet(refs, [j for j, _ in cases], {}, "h", drivers=drivers)
    gens = [Generated(Image.fromarray(img), halves if j.kind == "multi2" else whole) for j, img in cases]
    baselines = {k: Image.fromarray(blank) for k in evalset.baselines()}
    rows = score(evalset, gens, baselines, FaceCache(analyzer), clip, LandmarkRule())

    def row(job, variant):
        (r,) = [r for r in rows if r["job"] == job and r["variant"] == variant]
        return r

    a, b, c = row(0, "id"), row(1, "id"), row(2, "id")
    assert a["id_similarity"] == pytest.approx(1.0, abs=1e-6) and a["identified"] is True
    assert a["copy_paste"] == pytest.approx(1.0 - _cos(emb["a"], emb["A"]), abs=1e-6) and a["copy_paste"] > 0
    assert b["id_similarity"] == pytest.approx(_cos(emb["B"], emb["b"]), abs=1e-6) and b["identified"] is True
    assert b["copy_paste"] == pytest.approx(b["id_similarity"] - 1.0, abs=1e-6) and b["copy_paste"] < 0
    assert (c["detected"], c["id_similarity"], c["identified"], c["copy_paste"]) == (False, 0.0, False, None)
    assert row(0, "baseline")["detected"] is False and row(0, "baseline")["id_similarity"] == 0.0
    sh = {r["identity"]: r for r in rows if r["variant"] == "shuffled"}
    assert sh["a"]["id_similarity"] == pytest.approx(_cos(emb["B"], emb["a"]), abs=1e-6)
    assert sh["c"]["id_similarity"] == pytest.approx(_cos(emb["A"], emb["c"]), abs=1e-6)

    # multi: swapped layout matched back to the right people; A twice confuses B; B left out is missing
    m = [r for r in rows if r["job"] == 6 and r["variant"] == "id"]
    assert [r["identity"] for r in m] == ["a", "b"] and [r["confused"] for r in m] == [False, False]
    assert m[0]["id_similarity"] == pytest.approx(_cos(emb["A"], emb["a"]), abs=1e-3)
    assert [r["confused"] for r in rows if r["job"] == 7 and r["variant"] == "id"] == [False, True]
    assert [r["detected"] for r in rows if r["job"] == 8 and r["variant"] == "id"] == [True, False]

    # edit: pose measured on the output against "turned to the left" (yaw -35, pitch 0)
    ed = row(9, "edit")
    yaw, pitch, _ = analyzer.detect(alt_a)[0].pose
    assert ed["pose_error"] == pytest.approx((abs(yaw + 35) + abs(pitch)) / 2, abs=1e-6)
    assert ed["target_yaw"] == -35.0 and ed["expression_agree"] is None  # no expression requested
    # landmark edit: read against the driving photo's labels (expression and pose)
    dr = row(10, "edit")
    assert dr["kind"] == "drive" and dr["edit"] == "landmarks of kb2"
    assert dr["pose_error"] == pytest.approx((abs(yaw + 30) + abs(pitch - 5)) / 2, abs=1e-6)
    assert dr["target_expression"] == "happy" and dr["expression_agree"] in (0.0, 1.0)

    agg = aggregate(rows)
    lifts = [a["id_similarity"] - sh["a"]["id_similarity"], b["id_similarity"] - sh["b"]["id_similarity"],
             0.0 - sh["c"]["id_similarity"]]
    assert agg["single.id_lift"] == pytest.approx(np.mean(lifts), abs=1e-5)
    assert agg["single.id_lift_low"] <= agg["single.id_lift"] <= agg["single.id_lift_high"]
    assert agg["single.identification_rate"] == pytest.approx(2 / 3, abs=1e-6)
    assert agg["single.identification_chance"] == pytest.approx(1 / 3, abs=1e-6)
    assert agg["single.detection_rate"] == pytest.approx(2 / 3, abs=1e-6) and agg["single.people"] == 3
    assert agg["single.copy_paste"] == pytest.approx((a["copy_paste"] + b["copy_paste"]) / 2, abs=1e-5)
    assert agg["multi2.confusion_rate"] == pytest.approx(np.mean([0.0, 0.5]), abs=1e-5)  # a: 0 of 3, b: 1 of 2
    assert agg["multi2.missing_rate"] == pytest.approx(np.mean([0.0, 1 / 3]), abs=1e-5)  # a: 0 of 3, b: 1 of 3
    un = row(9, "unedited")  # the unedited image is a's single case: the reference photo
    assert un["pose_error"] is not None and ed["pose_error"] is not None
    assert agg["edit.pose_error_gain"] == pytest.approx(un["pose_error"] - ed["pose_error"], abs=1e-5)
    dun = row(10, "unedited")
    assert agg["drive.pose_error_gain"] == pytest.approx(dun["pose_error"] - dr["pose_error"], abs=1e-5)
    assert agg["drive.people"] == 1


def test_identical_images_with_own_and_other_tokens_give_a_lift_of_exactly_zero(people, analyzer, clip):
    """What an identity-blind model produces: the same image whoever's photo is given."""
    from components.evaluate.evalset import EvalSet, Job, Reference
    from components.evaluate.generation import Generated
    from components.evaluate.scoring import FaceCache, score

    refs = [Reference(k, k, r, analyzer.detect(r)[0].embedding) for k, (r, _) in zip("abc", people)]
    alt = people[0][1]
    jobs = [Job("single", (i,), "p", 0) for i in range(3)] + [Job("shuffled", ((i + 1) % 3,), "p", 0, against=i)
                                                             for i in range(3)]
    gens = [Generated(Image.fromarray(alt), [[0, 0, 1, 1]]) for _ in jobs]  # one image for every input
    evalset = EvalSet(refs, jobs, {}, "h")
    agg = aggregate(score(evalset, gens, {("p", 0): Image.fromarray(alt)}, FaceCache(analyzer), clip, LandmarkRule()))
    assert agg["single.id_lift"] == 0.0 and agg["single.id_lift_low"] == 0.0 and agg["single.id_lift_high"] == 0.0
    assert agg["single.identification_rate"] == pytest.approx(1 / 3)  # one person identified: chance


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
    control = [(j.refs[0], j.against) for j in a.jobs if j.kind == "shuffled"]
    assert sorted(control) == [(0, 2), (1, 0), (2, 1)]
    assert all(own != other for own, other in control)  # always another held-out person's photo
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
    # single: 3 people x (own, another's photo, ID off); multi: 2 + 3 persons x (on, off); 6 edits x 2
    assert len(rows) == 3 * 3 + 2 * (2 + 3) + 2 * 6
    assert metrics["single"]["people"] == 3
    for kind in ("single", "multi2", "multi3"):
        for leaf, variant, col in [("id_similarity", "id", "id_similarity"), ("clip_t", "id", "clip_t"),
                                   ("baseline_clip_t", "baseline", "clip_t")]:
            assert metrics[kind][leaf] == pytest.approx(_csv_mean(rows, kind, variant, col), abs=2e-6), (kind, leaf)
        if kind != "single":
            missing = np.mean([r["detected"] == "False" for r in rows if r["kind"] == kind and r["variant"] == "id"])
            assert metrics[kind]["missing_rate"] == pytest.approx(missing)
    detected = np.mean([r["detected"] == "True" for r in rows if r["kind"] == "single" and r["variant"] == "id"])
    assert metrics["single"]["detection_rate"] == pytest.approx(detected)
    assert metrics["single"]["id_lift"] == pytest.approx(
        metrics["single"]["id_similarity"] - metrics["single"]["shuffled_id_similarity"], abs=1e-5)
    # every baseline with the same prompt and seed is the same image, so it has one CLIP-T
    base = {(r["prompt"], r["seed"]): r["clip_t"] for r in rows if r["variant"] == "baseline"}
    assert all(r["clip_t"] == base[(r["prompt"], r["seed"])] for r in rows if r["variant"] == "baseline")

    report = json.loads((out / "report.json").read_text())
    assert report["eval_set_hash"] == json.loads((out / "eval_set.json").read_text())["hash"]
    from components.core.registry import checkpoint_digest

    assert report["checkpoint_digest"] == checkpoint_digest(ckpt)
    assert report["learning_checks"] == {}  # an untrained checkpoint carries no learning checks
    assert report["counts"]["images"] == 3 + 3 + 1 + 1 + 6 and report["counts"]["baseline_images"] == 3
    for name in report["grids"]:
        assert (out / name).exists()
    single = Image.open(out / "grids" / "single-000.png")  # reference | generated | other's photo | ID off
    assert single.width == 96 * 4 and single.height == 16 + 3 * (96 + 28)
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


def test_layout_comparison_adds_boxes_and_strips_cases(params, analyzer):
    """evaluate.layouts: every multi-ID case again with user boxes and with strips (multi<N> is the default, auto)."""
    from components.evaluate.evalset import build_eval_set

    base = build_eval_set(params, analyzer, clip_id="c")
    p = params.model_copy(deep=True)
    p.evaluate.layouts = ["boxes", "strips"]
    ev = build_eval_set(p, analyzer, clip_id="c")
    assert [j.kind for j in ev.jobs if j.kind.startswith("multi")] == [
        "multi2", "multi2_boxes", "multi2_strips", "multi3", "multi3_boxes", "multi3_strips"]
    assert ev.hash != base.hash and not any("layout" in j for j in base.definition["jobs"])
    assert len(ev.baselines()) == len(base.baselines())  # the ID-off images are shared
