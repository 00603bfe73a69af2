"""taurl.rollout"""
