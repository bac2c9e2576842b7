"""Re-exports every stage section so the root schema imports from one place.

Each section lives in its own module, owned by the stage that reads it.
"""

from components.core.config.data import DataParams, PrepareParams, SynthParams
from components.core.config.infra import MlflowParams, StorageParams
from components.core.config.train import TrainParams
from components.core.config.evaluate import EvaluateParams, GateParams
from components.core.config.serve import ServeParams
from components.core.config.orchestrate import DeployParams, PipelineParams

__all__ = [
    "DataParams", "PrepareParams", "SynthParams", "MlflowParams", "StorageParams", "TrainParams",
    "EvaluateParams", "GateParams", "ServeParams", "DeployParams", "PipelineParams",
]
