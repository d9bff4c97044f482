"""rollover.swarm"""
