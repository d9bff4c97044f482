"""Groups to training tensors: alignment of response tokens, staleness, packing."""

import torch

from rollover.rollout.types import Group, Sample
from rollover.trainer.batch import Row, collate, gather_response, pack, rows_from_groups, scatter_response, split_minibatches


def test_collate_aligns_response_tokens_with_next_token_positions():
    rows = [Row([5, 6], [7, 8, 9], [-0.1, -0.2, -0.3], [3, 2, 3], 1.5, False),
            Row([5], [4], [-0.4], [3], -0.5, True)]
    batch = collate(rows, pad_id=0, current_version=3, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Position t predicts token t+1: row 0's response 7,8,9 is predicted at positions 1,2,3.
    assert batch.response_mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert torch.allclose(batch.behaviour_logprobs, torch.tensor([[0, -0.1, -0.2, -0.3], [-0.4, 0, 0, 0]]))
    assert batch.stale_mask.tolist() == [[False, False, True, False], [False, False, False, False]]
    assert batch.truncated.tolist() == [False, True] and batch.advantages.tolist() == [1.5, -0.5]
    values = torch.arange(8, dtype=torch.float32).view(2, 4)
    per_row = scatter_response(values, rows)
    assert [v.tolist() for v in per_row] == [[1.0, 2.0, 3.0], [4.0]]
    back = gather_response(per_row, rows, 5, torch.device("cpu"))
    assert back.tolist() == [[0, 1, 2, 3], [4, 0, 0, 0]]


def test_a_peers_rows_are_marked_external_never_stale():
    own = Group(0, {}, [Sample([5], [6, 7], [-0.1, -0.2], [1, 2], "stop", 1.0)])
    peer = Group(-1, {}, [Sample([5, 5], [8], finish_reason="stop", reward=0.0)], sender="abc")
    rows = rows_from_groups([own], torch.tensor([[1.0]])) + rows_from_groups([peer], torch.tensor([[-1.0]]))
    assert rows[1].behaviour_logprobs is None and rows[1].versions is None and rows[1].advantage == -1.0
    batch = collate(rows, pad_id=0, current_version=2, device=torch.device("cpu"))
    assert batch.external_mask.tolist() == [[False, False], [False, True]]
    assert batch.stale_mask.tolist() == [[True, False], [False, False]]
    assert batch.behaviour_logprobs.tolist()[1] == [0.0, 0.0]


def test_rows_skip_empty_responses_and_carry_advantages():
    group = Group(0, {}, [Sample([1], [2], [-1.0], [0], "stop", 1.0), Sample([1], [], [], [], "length", 0.0)])
    rows = rows_from_groups([group], torch.tensor([[0.5, -0.5]]))
    assert len(rows) == 1 and rows[0].advantage == 0.5 and rows[0].response_ids == [2]


def test_pack_respects_the_token_budget():
    rows = [Row([1] * n, [2], [0.0], [0], 0.0, False) for n in (9, 2, 5, 3, 30)]
    batches = pack(rows, token_budget=20)
    assert sorted(len(r.prompt_ids) for b in batches for r in b) == [2, 3, 5, 9, 30]
    for b in batches:
        assert len(b) == 1 or len(b) * max(r.length for r in b) <= 20
    assert [r.length for r in batches[0]] == [31]  # over budget alone


def test_minibatches_partition_the_rows():
    rows = [Row([i], [i], [0.0], [0], 0.0, False) for i in range(10)]
    parts = split_minibatches(rows, 3, seed=1)
    assert len(parts) == 3 and sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(r.prompt_ids[0] for p in parts for r in p) == list(range(10))
