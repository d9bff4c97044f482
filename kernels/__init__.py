"""rollover.kernels"""
