"""
Data: the GPT-2 tokenizer built offline, text corpora cached as uint16 token bins, and batches.

- `gpt2_encoding()` builds tiktoken's GPT-2 BPE from the shipped `data/gpt2.tiktoken` ranks, so
  nothing is downloaded (`tiktoken.get_encoding("gpt2")` would fetch the same file from the web).
- `prepare(name)` tokenises `data/<name>/input.txt` once into `train.bin` / `val.bin` (90/10 split,
  like nanoGPT's shakespeare prep). Any folder with an `input.txt` is a dataset.
- `get_batch` samples random windows with an explicit torch.Generator, so a checkpoint can store
  the sampler state and a resumed run draws exactly the batches an uninterrupted run would.
- `SyntheticMixture` (`--dataset=synthetic`): sequences made of segments, each drawn from one of a
  few token sources (random sparse Markov chains over partly overlapping token ranges), with the
  source label of every token kept, so that expert specialization can be measured against a known
  split: NMI(top-1 expert, source).
"""

import os

import numpy as np
import tiktoken
import tiktoken.load
import torch

from rundir import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# The GPT-2 (r50k) pre-tokenisation regex: contractions, letter runs, digit runs, punctuation runs,
# whitespace. Together with the ranks file it defines the encoding.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_encoding():
    path = os.path.join(DATA_DIR, "gpt2.tiktoken")
    if not os.path.exists(path):
        raise UserError(f"tokenizer ranks not found: {path} (the repository ships them)")
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def prepare(name, verbose=True):
    """Tokenise data/<name>/input.txt into train.bin/val.bin (re-done when the text is newer)."""
    folder = os.path.join(DATA_DIR, name)
    src = os.path.join(folder, "input.txt")
    if not os.path.isfile(src):
        raise UserError(f"dataset '{name}': no text file at {src} (put an input.txt there, or use "
                        f"--dataset=shakespeare or --dataset=synthetic)")
    bins = [os.path.join(folder, f"{split}.bin") for split in ("train", "val")]
    if all(os.path.exists(b) and os.path.getmtime(b) >= os.path.getmtime(src) for b in bins):
        return folder
    try:
        with open(src, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise UserError(f"dataset '{name}': {src} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    n = int(0.9 * len(text))
    enc = gpt2_encoding()
    parts = [enc.encode_ordinary(part) for part in (text[:n], text[n:])]
    if not all(parts):
        raise UserError(f"dataset '{name}': {src} holds {len(text)} characters, too little text for a train and "
                        f"a val split")
    for b, ids in zip(bins, parts):
        tmp = f"{b}.tmp.{os.getpid()}"
        np.array(ids, dtype=np.uint16).tofile(tmp)  # GPT-2 ids < 2**16
        os.replace(tmp, b)  # atomic: a crash never leaves half a bin behind
        if verbose:
            print(f"prepared {b}: {len(ids):,} tokens")
    return folder


def load_split(folder, split):
    return np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of `block_size` tokens: inputs x and next-token targets y, each (B, S)."""
    if len(data) <= block_size:
        raise ValueError(f"split has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class SyntheticMixture:
    """
    n_sources Markov chains over token ids [0, vocab). Source s lives on the range
    [s*w/2, s*w/2 + w) with w = 2*vocab/(n_sources+1): neighbouring sources share half their
    tokens, so the token id alone does not give the source away. A sequence is cut into segments of
    seg_len tokens; each segment picks its source uniformly, starts at a uniform token of its range,
    and then moves from token i to one of `branching` successors in the range (random weights,
    the row trans[s, i]).
    """

    def __init__(self, vocab=256, n_sources=4, seg_len=32, branching=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.n_sources, self.seg_len = vocab, n_sources, seg_len
        width = 2 * vocab // (n_sources + 1)
        self.ranges = [(s * width // 2, s * width // 2 + width) for s in range(n_sources)]
        self.entry = torch.zeros(n_sources, vocab)                          # (S, V) segment starts
        self.trans = torch.zeros(n_sources, vocab, vocab)                   # (S, V, V) in-range rows
        for s, (lo, hi) in enumerate(self.ranges):
            self.entry[s, lo:hi] = 1.0 / (hi - lo)
            for i in range(lo, hi):
                nxt = lo + torch.randperm(hi - lo, generator=g)[:branching]
                w = torch.rand(branching, generator=g) + 0.1
                self.trans[s, i, nxt] = w / w.sum()

    def batch(self, batch_size, block_size, generator, device):
        """x, y (B, S) token ids and the source label of each input token (B, S)."""
        n = block_size + 1
        n_seg = -(-n // self.seg_len)
        seg_src = torch.randint(self.n_sources, (batch_size, n_seg), generator=generator)
        labels = seg_src.repeat_interleave(self.seg_len, dim=1)[:, :n]      # (B, S+1)
        tokens = torch.zeros(batch_size, n, dtype=torch.long)
        for t in range(n):
            src = labels[:, t]
            rows = self.entry[src] if t % self.seg_len == 0 else self.trans[src, tokens[:, t - 1]]  # (B, V)
            tokens[:, t] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device), labels[:, :-1].to(device)
