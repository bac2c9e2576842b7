"""Semantic-Activated Attention (method.md, Components 2) as diffusers attention processors.

Every cross-attention of the UNet gets an ``SAAAttnProcessor``: the base attention over the
text tokens plus an identity branch over the ID tokens appended after them, gated per query
by how strongly that query responds to the ID tokens, and routed so that a face region only
reads its own identity. Every self-attention gets a ``LoRAAttnProcessor`` (LoRA only).

Why this differs from the research release (method.md, "Where the release is wrong or slow"):

* text and self attention are one ``scaled_dot_product_attention`` call each; the release
  builds the full self-attention matrix and computes the text attention twice;
* the ID branch never materialises its score tensor outside SDPA: the gate only needs the
  sum of the scores over heads and ID tokens, which is exactly
  ``Q . (sum_t K_id[t]) / sqrt(d)`` (a dot product with one summed key), and the routing is
  a boolean SDPA mask;
* region masks are built once per (context, query grid, device) with broadcasting, never
  per call and never with a Python loop over boxes;
* LoRA can be folded into the base weights for inference (``merge_lora``).

The per-call state (number of identities, regions, scale, boost) travels in an
``IDContext`` through ``unet(..., cross_attention_kwargs={"id_context": ctx})``; processors
keep no per-call state of their own, so one UNet serves concurrent requests with different
layouts.

Modules (import from the defining one; this package re-exports nothing):

* ``model.saa.regions``: ``default_regions``, ``validate_regions``, ``RegionMasks``;
* ``model.saa.context``: ``IDContext``, the per-call state and its cached region masks;
* ``model.saa.lora``: ``LoRALinear``, the shared q/k/v/out host, ``LoRAAttnProcessor`` (self-attention);
* ``model.saa.processor``: ``SAAAttnProcessor`` (cross-attention: text + gated, routed ID branch);
* ``model.saa.install``: ``install_saa``, ``saa_state_dict``, ``load_saa_state_dict``, ``merge_lora``.
"""
