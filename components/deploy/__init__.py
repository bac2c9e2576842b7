"""``dynamicid deploy`` and ``dynamicid launch``: the launchers that put a registered model (KServe
InferenceService) or a training stage (PyTorchJob) on a cluster, and the manifest helpers they share.
"""
