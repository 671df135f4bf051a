"""
Data: tokenizers, corpora as token bins, batches, and the synthetic task.

    python data.py prepare SRC NAME [--tokenizer=PATH] [--workers=N] [--val_fraction=F]
        # a corpus of any size -> data/NAME/{train,val}.bin, then: python train.py --dataset=NAME

- `gpt2_encoding()` builds tiktoken's GPT-2 BPE from the shipped `data/gpt2.tiktoken` ranks, so
  nothing is downloaded (`tiktoken.get_encoding("gpt2")` would fetch the same file from the web).
  `load_tokenizer(out_dir)` gives a checkpoint's own tokenizer.json (an imported model, through the
  `tokenizers` package) or GPT-2's, with one interface: encode_ordinary, decode, n_vocab.
- `prepare(name)` tokenises a small `data/<name>/input.txt` in one go into train.bin / val.bin
  (90/10 by characters, like nanoGPT's shakespeare prep).
- `prepare_stream(src, name)` (the command above) streams a corpus of any size: a text file, or a
  folder of .txt files and .jsonl files (one JSON object with a "text" field per line). Text is
  cut into ~1 MB chunks only where GPT-2's pre-tokeniser splits anyway (before a word after a
  newline or a space), so the tokens equal a one-shot encoding; chunks are tokenised by a pool of
  processes, a bounded batch at a time (memory does not grow with the corpus); documents are
  separated by the end-of-text token. The last val_fraction of the tokens is the val split.
- Both write uint16 bins (uint32 for vocabularies above 65,536 ids) into temp files and rename
  them into place, then write meta.json last: a set without meta.json is incomplete and is not
  used, so an interrupted preparation never leaves a half-written bin in use.
- `get_batch` samples random windows with an explicit torch.Generator, so a checkpoint can store
  the sampler state and a resumed run draws exactly the batches an uninterrupted run would.
- `SyntheticMixture` (`--dataset=synthetic`): sequences made of segments, each drawn from one of a
  few token sources (random sparse Markov chains over partly overlapping token ranges), with the
  source label of every token kept, so that expert specialization can be measured against a known
  split: NMI(top-1 expert, source).
"""

import json
import os
import sys
import time

import numpy as np
import tiktoken
import tiktoken.load
import torch

from rundir import ArgParser, UserError

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


def load_tokenizer(path=None):
    """GPT-2's BPE, or the tokenizer.json at `path` (a file, or a directory holding one)."""
    if path and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json") if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    if not path or path == "gpt2":
        return gpt2_encoding()
    if not os.path.isfile(path):
        raise UserError(f"tokenizer {path} not found")
    return JsonTokenizer(path)


# ------------------------------------------------------------------------------------------------
# corpora -> token bins

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


def prepare(name, verbose=True):
    """data/<name>: ready bins, or tokenise its input.txt (re-done when the text is newer)."""
    folder = os.path.join(DATA_DIR, name)
    src, marker = os.path.join(folder, "input.txt"), os.path.join(folder, "meta.json")
    if not os.path.isfile(src):
        if os.path.isfile(marker):             # prepared by prepare_stream
            return folder
        raise UserError(f"dataset '{name}': no text file at {src} and no prepared bins (put an input.txt there, "
                        f"run python data.py prepare SRC {name}, or use --dataset=shakespeare or synthetic)")
    if os.path.isfile(marker) and os.path.getmtime(marker) >= os.path.getmtime(src):
        return folder
    try:
        with open(src, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise UserError(f"dataset '{name}': {src} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    n = int(0.9 * len(text))
    enc = gpt2_encoding()
    ids = [np.array(enc.encode_ordinary(part), dtype=np.uint16) for part in (text[:n], text[n:])]  # GPT-2: < 2**16
    if not all(len(i) for i in ids):
        raise UserError(f"dataset '{name}': {src} holds {len(text)} characters, too little text for a train and "
                        f"a val split")
    finish_bins(folder, {split: part.tofile for split, part in zip(("train", "val"), ids)},
                {"tokenizer": "gpt2", "dtype": "uint16", "max_id": int(max(i.max() for i in ids)),
                 "tokens": {"train": len(ids[0]), "val": len(ids[1])}})
    if verbose:
        print(f"prepared {folder}: {len(ids[0]):,} train and {len(ids[1]):,} val tokens")
    return folder


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as err:  # edited or damaged by hand: ours are written whole (temp file + rename)
        raise UserError(f"{path} is not JSON ({err}); delete it and prepare the data again: train.py "
                        f"re-tokenises an input.txt, else run python data.py prepare") from None


def load_split(folder, split):
    return np.memmap(os.path.join(folder, f"{split}.bin"), dtype=read_meta(folder)["dtype"], mode="r")


def max_token_id(folder):
    return read_meta(folder)["max_id"]


CHUNK = 1 << 20  # characters per chunk: a unit of work for one process


def safe_cut(text):
    """The last index where GPT-2's pre-tokeniser splits anyway (a newline or a space followed by
    a non-space, after a non-space), or -1: cutting there changes no token."""
    for sep in ("\n", " "):
        i = len(text) - 1
        while True:
            i = text.rfind(sep, 0, i)
            if i <= 0:
                break
            after, before = text[i + 1:i + 2], text[i - 1]
            if after and not after.isspace() and not before.isspace():
                return i + 1 if sep == "\n" else i   # after the newline; before the space (it starts a word)
    return -1


def documents(src):
    """Yield (path, text of one document) for a file or a folder of .txt/.jsonl files."""
    files = [src] if os.path.isfile(src) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(src) for f in names if f.endswith((".txt", ".jsonl")))
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            yield path, json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise UserError(f"{path} line {n}: not a JSON object with a 'text' field") from None
        else:
            yield path, None  # read in blocks below: a .txt file may be larger than memory


def chunks(src):
    """(text chunk, ends a document, bytes read so far) in corpus order, each chunk ~CHUNK characters."""
    done = 0
    for path, text in documents(src):
        if text is not None:
            done += len(text.encode("utf-8")) + 1
            yield text, True, done
            continue
        carry = ""
        with open(path, encoding="utf-8") as fh:
            while True:
                block = fh.read(CHUNK)
                done += len(block.encode("utf-8"))
                if not block:
                    break
                text = carry + block
                cut = safe_cut(text)
                if cut <= 0 and len(text) < 16 * CHUNK:  # no safe place yet: read on
                    carry = text
                    continue
                cut = cut if cut > 0 else len(text)      # one 16-MB run without a word boundary: cut anyway
                carry = text[cut:]
                yield text[:cut], False, done
        yield carry, True, done


_worker_tok = None


def _init_worker(tokenizer):
    global _worker_tok
    _worker_tok = load_tokenizer(tokenizer)


def _encode(job):
    text, ends = job
    ids = _worker_tok.encode_ordinary(text)
    if ends and getattr(_worker_tok, "eot_token", None) is not None:
        ids.append(_worker_tok.eot_token)        # documents are separated by end-of-text
    return np.array(ids, dtype=np.int64)


def prepare_stream(src, name, tokenizer=None, workers=None, val_fraction=0.01, progress=sys.stderr):
    """Tokenise a corpus of any size into data/<name>/{train,val}.bin with bounded memory."""
    from multiprocessing import get_context
    if not os.path.exists(src):
        raise UserError(f"{src} does not exist (a text file or a folder of .txt/.jsonl files)")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    workers = workers or max(1, (os.cpu_count() or 1))
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    tok = load_tokenizer(tokenizer)             # checked here, before any file is written
    folder = os.path.join(DATA_DIR, name)
    os.makedirs(folder, exist_ok=True)
    for stale in [f for f in os.listdir(folder) if ".tmp." in f]:
        os.remove(os.path.join(folder, stale))  # temp files of an interrupted preparation
    total = os.path.getsize(src) if os.path.isfile(src) else sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(src) for f in fs if f.endswith((".txt", ".jsonl")))
    dtype = bin_dtype(tok.n_vocab)
    tmp = os.path.join(folder, f"all.bin.tmp.{os.getpid()}")
    n, top, t0, last = 0, 0, time.time(), 0.0
    with get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool, open(tmp, "wb") as out:

        def tokenise(batch, done):  # a bounded batch at a time: memory does not grow with the corpus
            nonlocal n, top, last
            for ids in pool.map(_encode, batch):
                out.write(ids.astype(dtype).tobytes())
                n += len(ids)
                top = max(top, int(ids.max()) if len(ids) else 0)
            if progress and time.time() - last > 0.5:
                last = time.time()
                print(f"\r{done / 1e6:,.0f} / {total / 1e6:,.0f} MB, {n / 1e6:,.1f}M tokens, "
                      f"{n / (last - t0) / 1e3:,.0f}k tokens/s", end="", file=progress, flush=True)

        batch = []
        for text, ends, done in chunks(src):
            batch.append((text, ends))
            if len(batch) == 2 * workers:
                tokenise(batch, done)
                batch = []
        if batch:
            tokenise(batch, total)
    n_val = max(1, int(n * val_fraction))
    if n - n_val < 2:
        os.remove(tmp)
        raise UserError(f"{src} gives {n} tokens: too few for a train and a val split")
    tokens = np.memmap(tmp, dtype=dtype, mode="r", shape=(n,))

    def write_val(path):
        tokens[n - n_val:].tofile(path)

    def write_train(path):
        os.truncate(tmp, (n - n_val) * np.dtype(dtype).itemsize)  # the train split is the head: no copy
        os.replace(tmp, path)

    finish_bins(folder, {"val": write_val, "train": write_train},
                {"tokenizer": tokenizer or "gpt2", "dtype": np.dtype(dtype).name, "max_id": top,
                 "tokens": {"train": n - n_val, "val": n_val}, "source": os.path.abspath(src)})
    secs = time.time() - t0
    if progress:
        print(f"\r{total / 1e6:,.0f} MB -> {folder}: {n - n_val:,} train and {n_val:,} val tokens "
              f"({np.dtype(dtype).name}) in {secs:.1f} s, {n / secs / 1e3:,.0f}k tokens/s with {workers} processes",
              file=progress)
    return folder


# ------------------------------------------------------------------------------------------------
# batches and the synthetic task

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


def main(argv):
    parser = ArgParser(prog="python data.py", description="prepare a corpus: python data.py prepare SRC NAME")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("src", help="a text file, or a folder of .txt and .jsonl files")
    parser.add_argument("name", help="the dataset name: data/NAME, then train.py --dataset=NAME")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: GPT-2's BPE)")
    parser.add_argument("--workers", type=int, default=None, help="tokenising processes (default: one per core)")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="the last fraction of tokens for val")
    args = parser.parse_args(argv)
    if not args.name or os.sep in args.name or args.name in (".", "..", "synthetic"):
        raise UserError(f"NAME must be a plain folder name under data/, got '{args.name}'")
    prepare_stream(args.src, args.name, args.tokenizer, args.workers, args.val_fraction)


if __name__ == "__main__":
    from rundir import cli
    sys.exit(cli(main, sys.argv[1:]))
