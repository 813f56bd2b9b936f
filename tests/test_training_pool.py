import pytest

from pipelines.training.loop import _Pool


def test_pool_serves_every_example_once_per_pass_and_refuses_empty():
    pool = _Pool(list(range(5)), seed=0, source="data.jsonl")
    first, second = pool.take(5), pool.take(5)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4] and first != second  # reshuffled each pass
    assert len(pool.take(7)) == 7
    with pytest.raises(ValueError, match="data.jsonl: too few examples"):
        _Pool([], seed=0, source="data.jsonl")
