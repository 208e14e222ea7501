"""Conditions of every supported structure: check, select, concatenate."""

import pytest
import torch

from twinflow.conditions import check_batch, concatenate, select


@pytest.mark.parametrize(
    "condition",
    [
        torch.arange(4),
        {"embeddings": torch.randn(4, 3, 2), "mask": torch.ones(4, 3)},
        (torch.randn(4, 5), {"mask": torch.zeros(4, 2)}),
        ["a cat", "a dog", "a bird", "a fish"],
    ],
    ids=["tensor", "mapping", "tuple", "prompts"],
)
def test_select_then_concatenate_restores_the_condition(condition):
    check_batch(condition, 4)
    head, tail = select(condition, slice(0, 1)), select(condition, torch.tensor([1, 2, 3]))
    check_batch(head, 1)
    check_batch(tail, 3)
    joined = concatenate([head, tail])

    def flat(value):
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, dict):
            return [t for key in sorted(value) for t in flat(value[key])]
        if all(isinstance(v, str) for v in value):
            return [list(value)]
        return [t for v in value for t in flat(v)]

    for original, restored in zip(flat(condition), flat(joined)):
        if isinstance(original, torch.Tensor):
            assert torch.equal(original, restored)
        else:
            assert original == restored


def test_errors_name_the_part():
    with pytest.raises(ValueError, match=r"cond\['mask'\] must have batch size 4"):
        check_batch({"embeddings": torch.randn(4, 2), "mask": torch.ones(3, 2)}, 4)
    with pytest.raises(ValueError, match="must have 4 entries"):
        check_batch(["a", "b"], 4)
    with pytest.raises(ValueError, match="same keys"):
        concatenate([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    assert concatenate([None, None]) is None
