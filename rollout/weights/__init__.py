"""rollover.rollout.weights: trainer weights into the engines, and the proof they arrived.

Every transport is a `weight_sync.WeightTransport` (a `push(llm, named_tensors)` coroutine)
that `RolloutEngine(weight_transport=...)` calls while its admission gate is closed; the backend
is chosen once from `cluster.weight_transfer` (`weight_transfer.weight_transport_for`,
`engine_side_transport`):

- `weight_sync`: the `WeightTransport` protocol, the tensor helpers every transport shares, and
  `SharedMemoryTransport` (a safetensors file in /dev/shm; CPU and any build)
- `ipc_buckets`: `BucketedIpcTransport`, CUDA-IPC buckets for an engine on the trainer's GPU
- `weight_transfer`: the backends, `NativeWeightTransport` (vLLM's NCCL weight-transfer API,
  the trainer as rank 0) and the choice of transport per backend
- `nccl_sender`, `weight_relay`: the two ends of an NCCL load to a Ray engine (the trainer-side
  sender in `RemoteEngine`; the actor that only relays vLLM's control calls)
- `weight_check`: the log-prob probe after every load, and the deadline every load runs under
"""
