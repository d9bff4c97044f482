"""rollover.algos"""
