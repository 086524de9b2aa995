"""Bad input to the Python API gets the clear errors the command line gives (issue 8).

An empty prompt to any `generate` (dense, replicated-head TP, vocabulary-parallel TP; greedy or
sampling) is a ValueError naming the shape; a token id outside [0, V) to any model's forward is
the IndexError "token ids must be in [0, V), got ids in [lo, hi]" (`model.check_token_ids`, the
one check all three models use). Both are raised on every rank before any communication.
"""

import pytest
import torch

from tp_helpers import make_gpt
from tputil.comm import SingleGroup, run_threads
from tputil.model import generate
from tputil.tp_model import TPGPT, VocabParallelTPGPT

EMPTY = r"the prompt needs at least one token to continue, got shape \(2, 0\)"


def ids_message(vocab, low, high):
    return rf"token ids must be in \[0, {vocab}\), got ids in \[{low}, {high}\]"


# ---------------------------------------------------------------------------- empty prompts


@pytest.mark.parametrize("greedy", [True, False])
def test_dense_generate_refuses_an_empty_prompt(greedy):
    model = make_gpt(n_layer=1)
    empty = torch.zeros(2, 0, dtype=torch.long)
    kwargs = dict(greedy=greedy, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=EMPTY):
        model.generate(empty, 3, **kwargs)
    with pytest.raises(ValueError, match=EMPTY):
        generate(model, empty, 3, **kwargs)  # the module-level function, which every model's generate uses
    with pytest.raises(ValueError, match=r"the prompt must be a \(B, T\) tensor of token ids, got shape \(4,\)"):
        model.generate(torch.zeros(4, dtype=torch.long), 3)


@pytest.mark.parametrize("cls", [TPGPT, VocabParallelTPGPT])
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("p", [1, 2])
def test_tp_generate_refuses_an_empty_prompt_before_communicating(cls, greedy, p):
    dense = make_gpt(n_layer=1, vocab_size=67)
    empty = torch.zeros(2, 0, dtype=torch.long)

    def fn(group):
        model = cls.from_dense(dense, group=group)
        with group.stats.measure() as m:
            with pytest.raises(ValueError, match=EMPTY):
                model.generate(empty, 3, greedy=greedy, generator=torch.Generator().manual_seed(0))
        return m.calls

    assert run_threads(fn, p) == [{}] * p  # every rank refuses, and none waits in a collective


# ---------------------------------------------------------------------------- token ids outside [0, V)


@pytest.mark.parametrize("ids, low, high", [([[0, 67]], 0, 67), ([[5, 200]], 5, 200), ([[-1, 3]], -1, 3)])
def test_dense_forward_refuses_ids_outside_the_vocabulary(ids, low, high):
    model = make_gpt(n_layer=1, vocab_size=67)
    with pytest.raises(IndexError, match=ids_message(67, low, high)):
        model(torch.tensor(ids))
    with pytest.raises(IndexError, match=ids_message(67, low, high)):
        model.generate(torch.tensor(ids), 2)
    model(torch.tensor([[0, 66]]))  # the ends of the range are tokens


@pytest.mark.parametrize("cls", [TPGPT, VocabParallelTPGPT])
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("ids, low, high", [([[0, 67]], 0, 67), ([[-1, 3]], -1, 3)])
def test_tp_forward_refuses_ids_outside_the_vocabulary_like_the_dense_model(cls, p, ids, low, high):
    """67 is a padding id at p = 2 and 3 (V_pad 68, 69): it has a row in the vocabulary-parallel model."""
    dense = make_gpt(n_layer=1, vocab_size=67)

    def fn(group):
        model = cls.from_dense(dense, group=group)
        with group.stats.measure() as m:
            with pytest.raises(IndexError, match=ids_message(67, low, high)):
                model(torch.tensor(ids))
        return m.calls

    assert run_threads(fn, p) == [{}] * p


def test_the_same_message_from_all_three_models():
    dense = make_gpt(n_layer=1, vocab_size=67)
    bad = torch.tensor([[3, 70]])
    messages = []
    for model in (
        dense,
        TPGPT.from_dense(dense, group=SingleGroup()),
        VocabParallelTPGPT.from_dense(dense, group=SingleGroup()),
    ):
        with pytest.raises(IndexError) as info:
            model(bad)
        messages.append(str(info.value))
    assert messages == ["token ids must be in [0, 67), got ids in [3, 70]"] * 3
