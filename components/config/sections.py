"""Re-exports every stage section so the root schema imports from one place.

Each section lives in its own module, owned by the stage that reads it.
"""

from components.config.data import DataParams, PrepareParams, SynthParams
from components.config.infra import MlflowParams, StorageParams
from components.config.train import TrainParams
from components.config.evaluate import EvaluateParams, GateParams
from components.config.serve import ServeParams
from components.config.orchestrate import DeployParams, PipelineParams

__all__ = [
    "DataParams", "PrepareParams", "SynthParams", "MlflowParams", "StorageParams", "TrainParams",
    "EvaluateParams", "GateParams", "ServeParams", "DeployParams", "PipelineParams",
]
