"""KServe model server for DynamicID: ``dynamicid serve`` / ``dynamicid infer`` (docs/serving.md).

Modules: predictor (the kserve.Model), server (ModelServer with host binding, readiness that
follows the model, body limit, error answers), schema + images (request validation), protocol
(v1/v2 mapping), batching (admission bound, dynamic batcher), engine (model-thread work, stage
timing), model_store (model_uri resolution), metrics, client + cli.
"""
