"""Stage functions of the dynamicid system and the one CLI that drives them.

Each stage (synth, prepare, train, evaluate, register, deploy, serve) is a plain
function in its own module with a ``register(subparsers)`` hook for the CLI. dvc.yaml,
the kfp pipeline and the k8s jobs only call the resulting ``dynamicid`` subcommands.
"""
