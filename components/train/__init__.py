"""The training stages of DynamicID (base, anchor, reconfigure) on DeepSpeed.

``dynamicid train`` is components.train.entry (CLI hook, process setup); the stage runners are
components.train.base_stage and components.train.dynamicid_stage, sharing components.train.stage_run.
"""
