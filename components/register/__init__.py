"""``dynamicid register``: the gate's verdict, then an atomic publish to the MLflow registry (the client lives here).
"""
