"""The one right-padding layout (engine/batching.py: padded_batch)."""
import pytest
import torch

from llama_erc.data import Sequence
from llama_erc.engine.batching import padded_batch


def test_padded_batch_right_pads():
    batch = padded_batch([Sequence((1, 5, 6, 7), (-100, -100, 6, 7)), Sequence((1, 9), (-100, 9))], pad_id=0)
    assert batch.ids.tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert batch.n_tokens == 6 and batch.weights is None and batch.positions is None and batch.mask is None
    assert batch.ids.dtype == batch.labels.dtype == torch.long
    weighted = padded_batch([Sequence((1, 5, 6), (-100, 5, 6), weight=0.5), Sequence((1, 9), (-100, 9))], pad_id=0)
    assert weighted.weights.tolist() == [[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="row 1 has 2 ids and 1 labels"):
        padded_batch([Sequence((1,), (1,)), Sequence((1, 2), (2,))], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        padded_batch([], pad_id=0)
