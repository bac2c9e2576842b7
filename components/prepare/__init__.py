"""``dynamicid prepare``: raw faces -> embeddings, landmarks, pose, face prompts -> shards, splits, report.
"""
