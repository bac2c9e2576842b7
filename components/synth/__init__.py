"""``dynamicid synth``: the deterministic synthetic face test-bed (embedded default only).
"""
