"""Serving the research release's weights (docs/release.md): its key tables, the import into our checkpoint format,
its keypoint encoder, and the inference conventions of its ``release`` compatibility mode.

Modules (import from the defining one; this package re-exports nothing):

* ``model.release.layout``: ``ReleaseLayout``, the release's tensors by key pattern and shape, processor order;
* ``model.release.reader``: reading a release file safely (``weights_only``) and finding its tensors by pattern;
* ``model.release.convert``: release tensors -> our checkpoint parts, ``import_release``;
* ``model.release.keypoint_encoder``: ``ReleaseKeypointEncoder``, the release's landmark CNN;
* ``model.release.compat``: the ``release`` inference conventions (boxes, gating off, CLIP input, landmarks).
"""
