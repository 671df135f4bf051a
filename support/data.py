"""
Data for a run: tokenizers, text datasets as token bins, batches, and the whole-split evaluation.

- Tokenizers, one interface (encode_ordinary, decode, n_vocab): GPT-2's BPE built by tiktoken from
  the shipped `data/gpt2.tiktoken` ranks (nothing is downloaded; `tiktoken.get_encoding("gpt2")`
  would fetch the same file from the web), a character vocabulary (nanoGPT's shakespeare_char), or
  a tokenizer.json (an imported model's, through the `tokenizers` package). A checkpoint records
  its tokenizer as a spec: "gpt2", {"chars": "..."}, or the path of a tokenizer.json.
- Datasets by name (`open_dataset`): `shakespeare_char` (the shipped text, 65 characters, nanoGPT's
  90/10 split by characters), `shakespeare` (the same text in GPT-2 BPE, 90/10), `shakespeare_bpe` (the
  same, keeping only the GPT-2 ids the text uses, renumbered: a ~11k-wide output layer), any data/<name>/
  holding an input.txt (GPT-2 BPE) or the bins of tools/prepare.py, and the synthetic tasks of
  support/tasks.py. Text is tokenised once into uint16 bins (uint32 above 65,536 ids): temp files
  renamed into place, meta.json last, so a set without meta.json is incomplete and never used.
- Batches are random windows drawn with an explicit torch.Generator, so a checkpoint can store the
  sampler state and a resumed run draws exactly the batches an uninterrupted run would. With W
  processes, one global batch of W*B windows is drawn and each rank takes its B.
- The whole-split evaluation reads the val split once, in consecutive windows of block_size.
"""

import json
import math
import os

import numpy as np
import tiktoken
import tiktoken.load
import torch

from support.rundir import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")

# The GPT-2 (r50k) pre-tokenisation regex: contractions, letter runs, digit runs, punctuation runs,
# whitespace. Together with the ranks file it defines the encoding.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_VOCAB = 50304  # the model's vocabulary for GPT-2's 50,257 ids: padded to a multiple of 64 (nanoGPT)


def gpt2_encoding():
    path = os.path.join(DATA_DIR, "gpt2.tiktoken")
    if not os.path.exists(path):
        raise UserError(f"tokenizer ranks not found: {path} (the repository ships them)")
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's shakespeare_char)."""

    def __init__(self, chars):
        self.chars, self.n_vocab, self.eot_token = chars, len(chars), None
        self.index = {c: i for i, c in enumerate(chars)}

    def encode_ordinary(self, text):
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise UserError(f"the text has characters outside this model's alphabet: {''.join(missing)[:20]!r}")
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class JsonTokenizer:
    """A tokenizer.json (Hugging Face `tokenizers`) with tiktoken's interface."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path} needs the tokenizers package (pip install tokenizers)") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as err:  # the package's own parse errors
            raise UserError(f"cannot read tokenizer {path} ({str(err).splitlines()[0]})") from None
        self.n_vocab, self.name = self.tok.get_vocab_size(), path
        eot = [t for t in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>") if self.tok.token_to_id(t) is not None]
        self.eot_token = self.tok.token_to_id(eot[0]) if eot else None

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids)


class SubsetTokenizer:
    """GPT-2's BPE restricted to the ids a corpus uses, renumbered 0..n-1 in GPT-2's order (a small output
    layer for a small corpus: shakespeare_bpe)."""

    def __init__(self, gpt2_ids):
        self.enc, self.ids, self.n_vocab, self.eot_token = gpt2_encoding(), list(gpt2_ids), len(gpt2_ids), None
        self.index = {t: i for i, t in enumerate(self.ids)}

    def encode_ordinary(self, text):
        ids = self.enc.encode_ordinary(text)
        missing = [t for t in ids if t not in self.index]
        if missing:
            raise UserError(f"the text has GPT-2 tokens outside this model's vocabulary: "
                            f"{self.enc.decode(missing[:5])!r}")
        return [self.index[t] for t in ids]

    def decode(self, ids):
        return self.enc.decode([self.ids[i] for i in ids])


def load_tokenizer(spec=None):
    """A tokenizer from its spec: None or "gpt2", {"chars": alphabet}, {"gpt2_ids": [...]}, a tokenizer.json,
    or a folder holding one (an imported model's out_dir; without one, GPT-2's)."""
    if isinstance(spec, dict):
        return SubsetTokenizer(spec["gpt2_ids"]) if "gpt2_ids" in spec else CharTokenizer(spec["chars"])
    if spec and os.path.isdir(spec):
        spec = os.path.join(spec, "tokenizer.json") if os.path.exists(os.path.join(spec, "tokenizer.json")) else None
    if not spec or spec == "gpt2":
        return gpt2_encoding()
    if not os.path.isfile(spec):
        raise UserError(f"tokenizer {spec} not found")
    return JsonTokenizer(spec)


# ------------------------------------------------------------------------------------------------
# text -> token bins

def bin_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2 ** 16 else np.uint32


def finish_bins(folder, parts, meta):
    """Write each split's ids to a temp file, rename into place, then meta.json last."""
    marker = os.path.join(folder, "meta.json")
    if os.path.exists(marker):
        os.remove(marker)                      # from here until the end the set is incomplete
    for split, write in parts.items():
        tmp = os.path.join(folder, f"{split}.bin.tmp.{os.getpid()}")
        write(tmp)
        os.replace(tmp, os.path.join(folder, f"{split}.bin"))
    with open(marker + f".tmp.{os.getpid()}", "w") as fh:
        json.dump(meta, fh)
    os.replace(marker + f".tmp.{os.getpid()}", marker)


BUILT_IN = {  # name -> (the text under data/, tokenizer): tokenised on first use
    "shakespeare_char": ("shakespeare/input.txt", "char"),
    "shakespeare": ("shakespeare/input.txt", "gpt2"),
    "shakespeare_bpe": ("shakespeare/input.txt", "gpt2_subset"),  # GPT-2 BPE, only the ids the text uses
}


def source_of(name):
    """The text a dataset is tokenised from (None: bins prepared by tools/prepare.py), and its tokenizer."""
    if name in BUILT_IN:
        path, tokenizer = BUILT_IN[name]
        return os.path.join(DATA_DIR, path), tokenizer
    src = os.path.join(DATA_DIR, name, "input.txt")
    return (src, "gpt2") if os.path.isfile(src) else (None, None)


def read_text(src, name):
    try:
        with open(src, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise UserError(f"dataset '{name}': {src} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def prepare(name, verbose=True):
    """data/<name>: ready bins, or tokenise its text 90/10 by characters (again when the text is newer)."""
    folder = os.path.join(DATA_DIR, name)
    src, tokenizer = source_of(name)
    marker = os.path.join(folder, "meta.json")
    if src is None:
        if os.path.isfile(marker):             # prepared by tools/prepare.py
            return folder
        raise UserError(f"dataset '{name}': no text file at {os.path.join(folder, 'input.txt')} and no prepared "
                        f"bins (put an input.txt there, run python tools/prepare.py SRC {name}, or use a dataset "
                        f"of docs/data.md: shakespeare_char, shakespeare, synthetic, facts, ...)")
    if os.path.isfile(marker) and os.path.getmtime(marker) >= os.path.getmtime(src):
        return folder
    text = read_text(src, name)
    n = int(0.9 * len(text))
    if tokenizer == "char":
        spec = {"chars": "".join(sorted(set(text)))}
        enc, vocab = CharTokenizer(spec["chars"]), len(spec["chars"])
    elif tokenizer == "gpt2_subset":
        spec = {"gpt2_ids": sorted(set(gpt2_encoding().encode_ordinary(text)))}
        enc, vocab = SubsetTokenizer(spec["gpt2_ids"]), padded(len(spec["gpt2_ids"]))
    else:
        spec, enc, vocab = "gpt2", gpt2_encoding(), GPT2_VOCAB
    ids = [np.array(enc.encode_ordinary(part), dtype=np.uint16) for part in (text[:n], text[n:])]  # < 2**16
    if not all(len(i) for i in ids):
        raise UserError(f"dataset '{name}': {src} holds {len(text)} characters, too little text for a train and "
                        f"a val split")
    os.makedirs(folder, exist_ok=True)
    finish_bins(folder, {split: part.tofile for split, part in zip(("train", "val"), ids)},
                {"tokenizer": spec, "vocab_size": vocab, "dtype": "uint16", "max_id": int(max(i.max() for i in ids)),
                 "tokens": {"train": len(ids[0]), "val": len(ids[1])}})
    if verbose:
        print(f"prepared {folder}: {len(ids[0]):,} train and {len(ids[1]):,} val tokens")
    return folder


def read_meta(folder):
    """data/<name>/meta.json, checked: the fields a set needs, of the right types."""
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:  # edited or damaged by hand: ours are written whole
        raise UserError(f"{path} is not JSON ({err}); delete it and prepare the data again: train.py "
                        f"re-tokenises an input.txt, else run python tools/prepare.py") from None
    tokens = meta.get("tokens") if isinstance(meta, dict) else None
    problems = [] if isinstance(meta, dict) else ["it is not a JSON object"]
    if not problems:
        if meta.get("dtype") not in ("uint16", "uint32"):
            problems.append(f"dtype is {meta.get('dtype')!r}, not 'uint16' or 'uint32'")
        if type(meta.get("max_id")) is not int or meta["max_id"] < 0:
            problems.append(f"max_id is {meta.get('max_id')!r}, not an integer >= 0")
        counts_ok = isinstance(tokens, dict) and all(type(tokens.get(s)) is int and tokens[s] >= 0
                                                      for s in ("train", "val"))
        if not counts_ok:
            problems.append(f"tokens is {tokens!r}, not {{'train': count, 'val': count}}")
        if "vocab_size" in meta and (type(meta["vocab_size"]) is not int or meta["vocab_size"] < 1):
            problems.append(f"vocab_size is {meta['vocab_size']!r}, not an integer >= 1")
    if problems:
        raise UserError(f"{path}: {problems[0]}; delete it and prepare the data again")
    return meta


def padded(n):
    """n token ids padded to a multiple of 64 (nanoGPT's, for the output layer's matmul)."""
    return -(-n // 64) * 64


def meta_vocab(meta):
    """The model vocabulary of a prepared set: as recorded, else its largest id + 1 padded to a multiple of 64."""
    return meta.get("vocab_size") or padded(meta["max_id"] + 1)


def vocab_of(name):
    """The model vocabulary a dataset needs, without writing anything (None if it cannot tell yet)."""
    from support.tasks import TASKS
    if name in TASKS:
        return TASKS[name]().vocab_size
    meta = os.path.join(DATA_DIR, name, "meta.json")
    src, tokenizer = source_of(name)
    if os.path.isfile(meta) and (src is None or os.path.getmtime(meta) >= os.path.getmtime(src)):
        return meta_vocab(read_meta(os.path.dirname(meta)))
    if tokenizer == "char" and src:
        return len(set(read_text(src, name)))
    if tokenizer == "gpt2_subset" and src:
        return padded(len(set(gpt2_encoding().encode_ordinary(read_text(src, name)))))
    return GPT2_VOCAB if tokenizer == "gpt2" else None


def load_split(folder, split, meta=None):
    """data/<name>/<split>.bin as a read-only array, checked against meta.json: its size must be the
    recorded number of tokens of the recorded dtype."""
    meta = meta or read_meta(folder)
    path = os.path.join(folder, f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing (meta.json names it); prepare the data again")
    size, item = os.path.getsize(path), np.dtype(meta["dtype"]).itemsize
    if size != meta["tokens"][split] * item:
        whole = "" if size % item == 0 else f", not a whole number of {meta['dtype']} tokens"
        raise UserError(f"{path} holds {size:,} bytes{whole}; meta.json says {meta['tokens'][split]:,} {meta['dtype']} "
                        f"tokens ({meta['tokens'][split] * item:,} bytes): prepare the data again")
    if size == 0:
        raise UserError(f"{path} is empty; prepare the data again")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def get_batch(data, batch_size, block_size, generator, device, rank=0, world=1):
    """Random windows of `block_size` tokens: inputs x and next-token targets y, each (B, S).
    With `world` processes, one global batch of world*B windows is drawn (the same generator state on
    every process) and this rank takes its B: the processes together see exactly the batch one
    process with batch world*B would, and one sampler state resumes any number of processes."""
    if len(data) <= block_size:
        raise ValueError(f"split has {len(data)} tokens, fewer than block_size+1={block_size + 1}")
    ix = torch.randint(len(data) - block_size, (batch_size * world,), generator=generator)
    ix = ix[rank * batch_size:(rank + 1) * batch_size].tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class TextData:
    """A tokenised corpus: random training windows, and its whole val split in consecutive windows."""

    def __init__(self, name, verbose=True):
        folder = prepare(name, verbose)
        meta = read_meta(folder)
        self.name, self.tokenizer, self.n_labels = name, meta.get("tokenizer", "gpt2"), 0
        self.vocab_size = meta_vocab(meta)
        self.max_id = meta["max_id"]
        self.splits = {split: load_split(folder, split, meta) for split in ("train", "val")}

    def check(self, block_size, vocab_size):
        for split, data in self.splits.items():
            if len(data) <= block_size:
                raise UserError(f"dataset '{self.name}': the {split} split has {len(data):,} tokens, fewer than "
                                f"block_size+1 = {block_size + 1} (use a smaller --block_size or more text)")
        if self.max_id >= vocab_size:
            raise UserError(f"dataset '{self.name}' has token id {self.max_id}, outside vocab_size={vocab_size}")

    def token_counts(self, split="train"):
        """(vocab_size,) int64 occurrences of each token id in a split."""
        return torch.from_numpy(np.bincount(self.splits[split], minlength=self.vocab_size).astype(np.int64))

    def batch(self, split, batch_size, block_size, generator, device, rank=0, world=1):
        """(x, y, None): no labels for text."""
        return (*get_batch(self.splits[split], batch_size, block_size, generator, device, rank, world), None)

    def whole_split(self, split, batch_size, block_size, device):
        """Every token of the split but the first exactly once as a target, in consecutive windows of
        block_size; the last window ends at the end of the split and scores only the targets that the
        window before it did not (the others get -100: no target, which cross_entropy ignores)."""
        data = self.splits[split]
        n = len(data) - 1                                         # targets
        starts = list(range(0, n - block_size + 1, block_size))
        if starts[-1] + block_size < n:
            starts.append(n - block_size)
        for i in range(0, len(starts), batch_size):
            windows = [data[s:s + block_size + 1] for s in starts[i:i + batch_size]]
            rows = torch.from_numpy(np.stack(windows).astype(np.int64))
            x, y = rows[:, :-1], rows[:, 1:].clone()                  # (b, S) each
            for j, s in enumerate(starts[i:i + batch_size]):
                seen = (starts[i + j - 1] + block_size - s) if i + j > 0 else 0
                y[j, :max(seen, 0)] = -100
            yield x.to(device), y.to(device), None


def open_dataset(name, vocab_size, verbose=True):
    """A text dataset or a synthetic task by name, for a model of vocab_size ids; both have batch()
    and whole_split()."""
    from support.tasks import TASKS
    return TASKS[name](vocab_size) if name in TASKS else TextData(name, verbose)


def standard_error(losses):
    """Standard error of a mean of per-token losses (as if independent: tokens of one window are not)."""
    return float(losses.std() / math.sqrt(max(len(losses), 1)))
