"""The fast inference path: identity injection at (almost) no cost over the base model.

Why each piece exists (numbers in docs/benchmarks.md, measured by ``benchmarks/``):

* **LoRA merged at load** (``merge_lora``): no extra matmuls per attention.
* **Per-request ID work hoisted out of the step.** The ID tokens are the same for every
  denoising step of a request, so the ID keys/values of all 16 cross-attentions, the gate's
  key direction, the routing mask (as an additive SDPA bias) and the boost terms are computed
  once per request into fixed buffers, and ``id_scale`` is folded into the ID values. A step
  runs the text attention exactly as the base model does plus four kernels per
  cross-attention: gate product, ID attention, and the gate (min-max, threshold, boost) fused
  with the gated add by ``torch.compile`` (eager fallback).
* **CUDA graphs per static-shape bucket.** At 512 px the SD1.5 step is launch-bound in eager
  mode (~3x its GPU time), so each (batch, latent size, identity count) bucket is captured
  once, warmed at load time, and replayed. The boost of the first steps changes the math, so a
  bucket holds two graphs (boost on / off), and a third for ``layout: auto``'s observation steps
  (activation maps recorded into a static buffer, model/saa/auto_run.py); the switch to the
  auto regions is a copy into the bucket's mask buffers, like any new request's layout.
  Everything that differs between requests of one bucket (latents, timestep, text states, ID
  tokens -> keys/values, masks, scale) lives in the bucket's static buffers and is refilled
  before a replay (the per-request key/value work is itself one captured graph), so a replay
  with another layout never reads stale masks.
* **Channels-last UNet weights** (CUDA): 14% faster base step at 512 px; the VAE decoder was
  measured slower channels-last and stays as it is.
* **Identity encoders as graphs** (``GraphedForward``): CLIP ViT-H/14, the face encoder and
  the text encoder run once per request but are launch-bound at request batch sizes.
* ``mode="compile"`` (torch.compile the UNet, then capture) is available but not the default:
  measured ~11% faster base step at 512 px, at ~1 min of compilation per bucket at load time
  and recompile-limit trouble with 16 distinct processors (docs/benchmarks.md).

On a CPU (tests, tiny profile) the same bucket machinery runs eagerly (``mode="eager"``):
nothing is captured, but the data flow through static buffers is the one the graphs use, so
the CPU tests cover the staleness logic.

Modules (import from the defining one; this package re-exports nothing):

* ``model.fast.enable``: ``enable_fast_path`` (the entry point: merge LoRA, install, warm) and ``FastPath``;
* ``model.fast.buckets``: ``BucketStepRunner``, the static-shape buckets and their CUDA graphs;
* ``model.fast.id_state``: ``StaticIDContext`` and the per-request ID keys/values and region buffers;
* ``model.fast.processor``: ``FastSAAProcessor`` and ``install_fast_processors`` / ``fast_processors``;
* ``model.fast.gate``: the gate fused with the gated add, eager or torch.compile'd;
* ``model.fast.graphed``: ``GraphedForward``, the identity encoders replayed as graphs.
"""
