"""GPU benchmarks of the identity-injection cost (docs/benchmarks.md): ``python -m benchmarks.run``.

Everything is built in code with random weights (nothing downloads): SD1.5-size UNet, VAE,
text encoder and CLIP ViT-H/14 image encoder, the project's DynamicID parts, and two
measurement references that live only here: the research release's processor design
(``release_design``) and a decoupled attention without gating (``decoupled``).
"""
