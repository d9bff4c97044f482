"""rollover.trainer"""
