"""``dynamicid summary``: what the chain produced, read back from its outputs.
"""
