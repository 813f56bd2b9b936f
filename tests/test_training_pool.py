import pytest

from pipelines.training.loop import _Pool


def test_pool_serves_every_example_once_per_pass_and_refuses_empty():
    pool = _Pool(list(range(5)), seed=0, source="data.jsonl")
    first, second = pool.take(5), pool.take(5)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4] and first != second  # reshuffled each pass
    assert len(pool.take(7)) == 7
    with pytest.raises(ValueError, match="data.jsonl: too few examples"):
        _Pool([], seed=0, source="data.jsonl")


def test_pool_restored_from_its_json_state_serves_the_same_examples_next():
    import json

    pool = _Pool(list(range(7)), seed=3, source="data.jsonl")
    pool.take(5)
    state = json.loads(json.dumps(pool.state()))  # what a training checkpoint holds
    expected = [pool.take(4) for _ in range(3)]
    restored = _Pool(list(range(7)), seed=99, source="data.jsonl")
    restored.restore(state)
    assert [restored.take(4) for _ in range(3)] == expected
