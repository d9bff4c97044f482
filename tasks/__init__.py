"""rollover.tasks"""
