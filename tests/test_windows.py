"""The windows of `perceiver_cli.models.clm.windows`: the one scoring-window function gives what the two it replaced
gave (evaluation's stream windows, cut from the start, and the Hugging Face forward's, cut from the end), and the
left padding that batches windows of different lengths."""

import pytest
import torch

from perceiver_cli.models.clm.windows import check_schedule, left_pad, scoring_windows


def old_clm_windows(num_tokens: int, max_seq_len: int, max_latents: int) -> list[tuple[int, int, int]]:
    """evaluation.clm_windows before the move: over a stream, targets 1 .. num_tokens-1, chunks from the start."""
    windows = []
    scored_until = 0
    while scored_until < num_tokens - 1:
        hi = min(scored_until + max_latents, num_tokens - 1)
        windows.append((max(0, hi - max_seq_len), hi, hi - scored_until))
        scored_until = hi
    return windows


def old_scoring_windows(num_positions: int, max_seq_len: int, max_latents: int) -> list[tuple[int, int, int]]:
    """decoding.scoring_windows before the move: every position its logits, chunks from the end."""
    windows = []
    hi = num_positions
    while hi > 0:
        k = min(max_latents, hi)
        windows.append((max(0, hi - max_seq_len), hi, k))
        hi -= k
    return windows[::-1]


SIZES = [(48, 12), (48, 48), (10, 1), (10, 3), (7, 7), (64, 16), (12, 5)]


@pytest.mark.parametrize("max_seq_len, max_latents", SIZES)
def test_one_function_gives_both_old_windows(max_seq_len, max_latents):
    for n in range(0, 3 * max_seq_len + 2):
        # A stream of n tokens has n - 1 input positions; position i predicts token i + 1.
        assert scoring_windows(max(0, n - 1), max_seq_len, max_latents) == old_clm_windows(n, max_seq_len, max_latents)
        assert scoring_windows(n, max_seq_len, max_latents, from_end=True) == old_scoring_windows(
            n, max_seq_len, max_latents
        )


@pytest.mark.parametrize("from_end", [False, True])
@pytest.mark.parametrize("length, stride", [(8, 3), (256, 64), (5, 1), (9, 9)])
def test_every_position_is_scored_once_with_a_context_of_at_most_the_length(from_end, length, stride):
    for n in (1, 2, stride, length, length + 1, 3 * length + 7):
        scored = []
        for lo, hi, k in scoring_windows(n, length, stride, from_end):
            assert 0 <= lo < hi <= n and hi - lo <= length and 1 <= k <= min(stride, hi - lo)
            assert lo == max(0, hi - length)  # the window reaches back as far as it may
            scored += range(hi - k, hi)
        assert scored == list(range(n))


def test_a_stride_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="stride"):
        scoring_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        scoring_windows(10, 4, 0)


def test_left_pad_lines_up_the_ends_and_masks_the_padding():
    x, pad_mask = left_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_value=9)
    assert x.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert pad_mask.tolist() == [[False, False, False], [True, True, False]]
    x, pad_mask = left_pad([torch.ones(2, 4), torch.zeros(2, 4)])  # embeddings (n, C), no padding
    assert x.shape == (2, 2, 4) and pad_mask is None


def test_check_schedule_raises_the_callers_error():
    assert check_schedule("sliding") == "sliding"
    with pytest.raises(ValueError, match="unknown schedule 'fast': use chunked or sliding"):
        check_schedule("fast")

    class Mistake(Exception):
        pass

    with pytest.raises(Mistake):
        check_schedule("fast", Mistake)
