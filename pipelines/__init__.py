"""Kubeflow Pipelines driver of the dynamicid stages (``dynamicid pipeline ...``).

The pipeline only wires ``dynamicid`` subcommands: every component body is one call of the CLI
(:mod:`pipelines.steps`), with artefact paths passed as CLI flags or params overrides, so that
``dvc repro``, a pipeline run and a hand-made Kubernetes job execute the same code.
"""
