"""Real checkpoints: what chapter 16 and its tests build checkpoints with, and its rank functions.

Derived in chapter 16. With no network, Hugging Face's own GPT-2 (`transformers`' GPT2LMHeadModel)
is built from a small random config and written with `save_pretrained`: the same files the hub
serves for `gpt2`, at a size a CPU loads in milliseconds. A tiny byte-level BPE trained with
`tokenizers` stands in for GPT-2's vocab.json and merges.txt. `transformers` is imported inside
the functions that need it: it is a dependency of the book and the tests, not of the package.

Rank functions for `launch.run_processes` (real gloo processes):
- `hf_rank(group, directory, idx)`: this rank loads its slices of a Hugging Face checkpoint,
  returns its full logits, the bytes it read from the file and the greedy tokens;
- `save_rank(group, dense, directory, vocab_parallel)`: this rank's TPGPT from `dense`, saved;
- `load_rank(group, directory, idx)`: this rank's TPGPT loaded from the TP checkpoint (resharded
  when p differs), its full logits and its greedy continuation.
"""

from pathlib import Path

import torch

from .. import checkpoint as ck, tp_checkpoint as tc
from ..tp_model import TPGPT


def hf_gpt2(
    directory=None,
    *,
    n_layer=2,
    n_head=4,
    n_embd=64,
    vocab_size=256,
    block_size=32,
    seed=0,
    std=0.2,
    safetensors=True,
):
    """A random `transformers.GPT2LMHeadModel` in eval mode, written to `directory` (if given) by save_pretrained.

    std: the weights' initializer_range (GPT-2's 0.02 gives logits so flat that greedy text repeats
    one token; 0.2 gives a model with preferences). safetensors=False writes pytorch_model.bin instead of
    model.safetensors (transformers 5 saves only safetensors, so torch.save writes it).
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's bar prints timings: not for stored outputs

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        initializer_range=std,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases at 0 and norms at 1: draw them too, so a slip shows
        for name, w in model.named_parameters():
            if name.endswith("bias"):
                w.normal_(0.0, 0.05)
            elif ".ln_" in name:
                w.normal_(1.0, 0.1)
    if directory is not None:
        model.save_pretrained(str(directory))  # config.json, model.safetensors (and generation_config.json)
        if not safetensors:  # the older layout: the state dict pickled by torch.save, as the hub's gpt2 has it too
            torch.save(model.state_dict(), Path(directory) / "pytorch_model.bin")
            (Path(directory) / "model.safetensors").unlink()
    return model


def hf_generate(model, idx, max_new_tokens):
    """Greedy tokens from Hugging Face's generate: no sampling, no early stop at an end-of-text id."""
    with torch.no_grad():
        return model.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def bpe_files(directory, text: str, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE of `vocab_size` ids on `text`; write vocab.json and merges.txt into directory.

    GPT-2's tokenizer is this kind (256 byte symbols, then merges), with 50257 ids.
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, show_progress=False)
    bpe.save_model(str(directory))
    return Path(directory)


class CountingSource(ck.Source):
    """A `Source` that passes reads through and counts the elements each one returns."""

    def __init__(self, source):
        self.source, self.shapes, self.elements = source, source.shapes, 0

    def read(self, name, dim, lo, hi):
        t = self.source.read(name, dim, lo, hi)
        self.elements += t.numel()
        return t


def hf_rank(group, directory, idx, new_tokens=8, vocab_parallel=False, dtype=torch.float32):
    """This rank's GPT-2 from a Hugging Face directory, read slice by slice; logits, elements read, tokens."""
    config, source = ck.open_gpt2(directory)
    counting = CountingSource(source)
    model = ck.tp_from_source(counting, config, group=group, dtype=dtype, vocab_parallel=vocab_parallel)
    with torch.no_grad():
        logits = model.gather_logits(model(idx)[0])
    return dict(logits=logits, elements_read=counting.elements, tokens=model.generate(idx, new_tokens))


def save_rank(group, dense, directory, vocab_parallel=False):
    """This rank's TPGPT sliced from `dense`, written to directory (tp_checkpoint.save); returns the files there."""
    model = TPGPT.from_dense(dense, group=group, vocab_parallel=vocab_parallel).eval()
    tc.save(model, directory)
    return sorted(p.name for p in Path(directory).iterdir())


def load_rank(group, directory, idx, new_tokens=16):
    """This rank's TPGPT from a TP checkpoint at group.world_size; its full logits and greedy tokens."""
    model = tc.load(directory, group=group)
    with torch.no_grad():
        logits = model.gather_logits(model(idx)[0])
    return dict(logits=logits, tokens=model.generate(idx, new_tokens))
