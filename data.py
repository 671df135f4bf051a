"""
Data: the GPT-2 tokenizer built offline, text corpora cached as uint16 token bins, and batches.

- `gpt2_encoding()` builds tiktoken's GPT-2 BPE from the shipped `data/gpt2.tiktoken` ranks, so
  nothing is downloaded (`tiktoken.get_encoding("gpt2")` would fetch the same file from the web).
- `prepare(name)` tokenises `data/<name>/input.txt` once into `train.bin` / `val.bin` (90/10 split,
  like nanoGPT's shakespeare prep). Any folder with an `input.txt` is a dataset.
- `get_batch` samples random windows with an explicit torch.Generator, so a checkpoint can store
  the sampler state and a resumed run draws exactly the batches an uninterrupted run would.
"""

import os

import numpy as np
import tiktoken
import tiktoken.load
import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# The GPT-2 (r50k) pre-tokenisation regex: contractions, letter runs, digit runs, punctuation runs,
# whitespace. Together with the ranks file it defines the encoding.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_encoding():
    path = os.path.join(DATA_DIR, "gpt2.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer ranks not found: {path}")
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def prepare(name):
    """Tokenise data/<name>/input.txt into train.bin/val.bin (re-done when the text is newer)."""
    folder = os.path.join(DATA_DIR, name)
    src = os.path.join(folder, "input.txt")
    if not os.path.exists(src):
        raise FileNotFoundError(f"dataset '{name}': no text file at {src} "
                                f"(put an input.txt there, or use --dataset=shakespeare)")
    bins = [os.path.join(folder, f"{split}.bin") for split in ("train", "val")]
    if all(os.path.exists(b) and os.path.getmtime(b) >= os.path.getmtime(src) for b in bins):
        return folder
    with open(src, encoding="utf-8") as fh:
        text = fh.read()
    n = int(0.9 * len(text))
    enc = gpt2_encoding()
    for b, part in zip(bins, (text[:n], text[n:])):
        ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)  # GPT-2 ids < 2**16
        tmp = b + ".tmp"
        ids.tofile(tmp)
        os.replace(tmp, b)  # atomic: a crash never leaves half a bin behind
        print(f"prepared {b}: {len(ids):,} tokens")
    return folder


def load_split(folder, split):
    return np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of `block_size` tokens: inputs x and next-token targets y, each (B, S)."""
    if len(data) <= block_size:
        raise ValueError(f"split has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
