"""Face analysis behind one small interface: detection, 5 keypoints, dense landmarks, identity
embedding and head pose, from one of two real backends chosen by params (FaceParams).

- ``insightface``: a model pack (buffalo_l, antelopev2, ...) through ``insightface.app.FaceAnalysis``:
  SCRFD detector with 5 keypoints, 2d106 landmarks, 512-d ArcFace embedding. What the method
  (method.md) is defined with; the production profile's default.
- ``dlib``: the models of ``face-recognition-models`` (installed with the package, so the tiny profile
  and CI need nothing downloaded): HOG or CNN (mmod) detector, 68-point iBUG landmarks, 5-point
  predictor for the embedding alignment, 128-d ResNet embedding.

Both return the same ``Face`` record; callers never branch on the backend except for the embedding
width (``embedding_dim``). Nothing here downloads: a missing model pack is an error naming the path.
Heavy imports (dlib, insightface, cv2, skimage, PIL) happen inside functions so importing these
modules stays cheap.

Modules (import from the defining one; this package re-exports nothing):

* ``model.face_analysis.face``: ``Face``, ``FaceAnalyzer``, the ``FaceAnalysisError`` family, ``pick_face``,
  ``face_crop_box``;
* ``model.face_analysis.images``: ``load_image``, ``pil_to_rgb``;
* ``model.face_analysis.geometry``: ``arcface_template``, ``align_face``, ``estimate_head_pose``;
* ``model.face_analysis.backends``: ``DlibFaceAnalyzer``, ``InsightFaceAnalyzer``, ``build_face_analyzer``,
  ``landmark_count``, ``kps_from_68``, ``dlib_model_dir``.
"""
