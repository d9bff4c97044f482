"""rollover.swarm: SAPO, training beside peers that share decoded rollouts over a hivemind DHT.

A node publishes its groups as text and trains on a few of its peers' (docs/ARCHITECTURE.md,
"Swarm"); nothing a peer sends is trusted. Reading order:

- `node.SwarmNode`: one peer inside rl-train: publish, collect in the background, `exchange`
- `records`: what one group looks like on the wire, and the swarm's clock (rounds)
- `transport.SwarmTransport`: signed, size-capped, sharded round records over the DHT
- `guard`: what a node's DHT process agrees to store or read (the validators hivemind runs)
- `entries`, `payload_cache`: reading a round's entries without trusting them, each once
- `inbox.Inbox`: cheap checks on arrival, costly ones (judging) only for what is trained
- `candidates`, `copies`, `credit`: the pool of admitted groups, the copy check, sender credit
- `identity`: a node's keys, kept in its run folder; `config`: the recipe's `swarm` section
- `cli`, `local`: `rl-swarm` (bootstrap, join, local, status)
"""
