"""DocumentIdMask: travels and counts like a mask tensor, refuses to be read as attention."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from am_packing import DocumentIdMask, get_unpad_data, is_indexed_packed_mask, validate_indexed_mask
from am_packing.marker import as_plain

IDS = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])


@pytest.fixture
def mask():
    return DocumentIdMask(IDS.clone())


def test_transport_keeps_the_marker_and_the_values(mask):
    from torch.utils.data._utils.pin_memory import pin_memory

    moved = [
        mask.to("cpu"),
        mask.to(device="cpu", dtype=torch.long),  # same dtype: a move
        mask.cpu(),
        mask.detach(),
        mask.clone(),
        mask.contiguous(),
        mask[:1],
        pickle.loads(pickle.dumps(mask)),
        copy.deepcopy(mask),
    ]
    if torch.cuda.is_available():
        moved += [mask.cuda().cpu(), pin_memory(mask)]
    for m in moved:
        assert isinstance(m, DocumentIdMask), type(m)
        assert torch.equal(as_plain(m), IDS[: as_plain(m).shape[0]])


def test_metadata_reads_normally(mask):
    assert mask.shape == (2, 6) and mask.ndim == 2 and mask.dim() == 2 and mask.size(1) == 6
    assert mask.dtype == torch.long and mask.device.type == "cpu" and mask.numel() == 12
    assert not mask.is_floating_point() and not mask.requires_grad and len(mask) == 2
    assert mask.tolist() == IDS.tolist()
    assert repr(mask) == f"DocumentIdMask({IDS!r})" == str(mask) == f"{mask}"


def test_sum_counts_tokens_like_the_padding_mask(mask):
    """Token counters (Trainer's non_padding, TRL's num_tokens) sum the attention mask."""
    total = mask.sum()
    assert type(total) is torch.Tensor and int(total) == 11 == int((IDS > 0).sum())


@pytest.mark.parametrize(
    "use",
    [
        lambda m: m.to(torch.bool),
        lambda m: m.to(device="cpu", dtype=torch.bool),  # transformers' _preprocess_mask_arguments
        lambda m: m.to(torch.float32),
        lambda m: m.to(torch.ones(1)),
        lambda m: m.bool(),
        lambda m: m.float(),
        lambda m: m > 0,
        lambda m: m == 1,
        lambda m: m * 2,
        lambda m: 1.0 - m,
        lambda m: m.sum(-1),
        lambda m: m.max(),
        lambda m: torch.cat([m, m]),
        lambda m: m[:, None, None, :].expand(2, 1, 6, 6),
        lambda m: np.asarray(m),
    ],
)
def test_every_other_use_raises_naming_enable_packing(mask, use):
    with pytest.raises(ValueError, match=r"DocumentIdMask.*enable_packing\(model\)"):
        use(mask)


def test_our_functions_read_the_ids(mask):
    validate_indexed_mask(mask)
    assert is_indexed_packed_mask(mask)
    assert get_unpad_data(mask).cu_seqlens.tolist() == [0, 2, 5, 6, 8, 11]
    assert type(mask.document_ids) is torch.Tensor and torch.equal(mask.document_ids, IDS)


@pytest.mark.parametrize("bad", [torch.ones(2, 2), torch.ones(2, dtype=torch.bool), [[1, 2]], None])
def test_only_integer_tensors_can_be_marked(bad):
    with pytest.raises(TypeError, match="document_ids must"):
        DocumentIdMask(bad)
