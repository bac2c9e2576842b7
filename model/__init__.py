"""DynamicID model package: torch + diffusers only.

Submodules are imported on demand (``from model.saa.install import ...``) so that light users
(params validation, the CLI's ``--help``) never pay for importing torch.
"""
