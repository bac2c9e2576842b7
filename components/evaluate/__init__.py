"""``dynamicid evaluate``: generate the evaluation set, read metrics back from the images, and the
promotion gate that judges them.
"""
