"""``dynamicid generate`` / ``dynamicid init``: one image from a checkpoint, and a fresh checkpoint.
"""
