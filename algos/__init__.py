"""rollover.algos: the RL maths as pure tensor functions (no I/O, models or engines).

- `advantages`: group-relative advantages (group, batch or no std)
- `filters`: dynamic sampling, DAPO's soft overlong penalty, the truncation mask
- `losses`: GRPO, DAPO, Dr. GRPO, BNPO, GSPO and GSPO-token as one function, with off-policy
  correction; `aggregate`: how per-token terms become one scalar (what tells the losses apart)
"""
