"""
Prepare a corpus of any size for training: text -> token bins under data/NAME.

    python tools/prepare.py SRC NAME [--tokenizer=PATH|char] [--workers=N] [--val_fraction=F]
    python train.py --dataset=NAME

SRC is a text file, or a folder of .txt files and .jsonl files (one JSON object with a "text" field
per line). The corpus is streamed: text is cut into ~1 MB chunks only where GPT-2's pre-tokeniser
splits anyway (before a word after a newline or a space), so the tokens equal a one-shot encoding;
chunks are tokenised by a pool of processes, a bounded batch at a time (memory does not grow with
the corpus); documents are separated by the end-of-text token. The last val_fraction of the tokens
is the val split. The bins are written by support/data.py's finish_bins: temp files renamed into
place, meta.json last, so an interrupted preparation leaves no set that loads.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from support.data import DATA_DIR, bin_dtype, finish_bins, load_tokenizer  # noqa: E402
from support.rundir import ArgParser, UserError, cli  # noqa: E402

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


def main(argv):
    parser = ArgParser(prog="python tools/prepare.py", description="prepare a corpus: SRC -> data/NAME")
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
    sys.exit(cli(main, sys.argv[1:]))
