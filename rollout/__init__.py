"""rollover.rollout"""
