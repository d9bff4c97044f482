"""rollover.trainer.distributed: the trainer as N data-parallel ranks (FSDP2), pure functions of a process group.

- `batch_split`: a mini-batch's rows over ranks, balanced by tokens (every rank computes the same split)
- `ranks`: `GroupRanks`, the `trainer/update.py` `Ranks` over a process group: global loss
  normalisers, micro-batch counts kept in step, one refusal for all, the global gradient-norm clip
- `shard`: the policy's model under `fully_shard` (one unit per decoder layer, then the root),
  FSDP's mixed-precision policy in place of autocast, gradients summed over ranks; `ShardedPolicy`
- `gather`: the engine's weights from the shards, bucket by bucket (LoRA merged), as
  `Policy.engine_weights` gives them for one process

- `sharded_learner`: `ShardedLearner`, one rank's `trainer/learner.py` `Learner` (the update over
  `GroupRanks`; engine weights and the model export gathered whole to rank 0; the optimizer's
  state written as each rank's DCP shards)
- `sharded_state`: trainable weights + optimizer state as torch.distributed.checkpoint shards in
  `<checkpoint>/dcp/`, per-rank RNG beside them; DCP reshards on load (any world size, or one process)
- `mirror`: rank 0 drives, the others follow: `LeaderLearner` announces each call on a command
  channel and runs it too; `follow` is a follower's loop; a dead rank is one `TrainerRankLost` line
- `launch`: `start_ranks`, called by rl-train for `train.world_size` > 1: spawns ranks 1..N-1 on
  this machine and joins them as rank 0
"""
