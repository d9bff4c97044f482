"""The SAPO swarm.

- `sapo_swarm`: does sharing rollouts help (I/J mixes against filtering alone), real swarms.
- `swarm_attack`: what a sybil flood costs an honest node.
"""
