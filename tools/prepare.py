"""
Prepare a corpus of any size for training: text -> token bins under data/NAME.

    python tools/prepare.py SRC NAME [--tokenizer=PATH|char] [--workers=N] [--val_fraction=F]
    python train.py --dataset=NAME

SRC is a text file, or a folder of .txt files, .jsonl files (one JSON object with a "text" field
per line) and .parquet files (a "text" column, e.g. FineWeb-Edu's shards; needs pyarrow). The corpus
is streamed: text is cut into ~1 MB chunks only where GPT-2's pre-tokeniser
splits anyway (before a word after a newline or a space), so the tokens equal a one-shot encoding;
chunks are tokenised by a pool of processes, a bounded batch at a time (memory does not grow with
the corpus); documents are separated by the end-of-text token. The last val_fraction of the tokens
is the val split. The bins are written by support/data.py's finish_bins: temp files renamed into
place, meta.json last, so an interrupted preparation leaves no set that loads.
"""

import codecs
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from support.data import DATA_DIR, GPT2_VOCAB, bin_dtype, finish_bins, load_tokenizer  # noqa: E402
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


SUFFIXES = (".txt", ".jsonl", ".parquet")


def corpus_files(src):
    return [src] if os.path.isfile(src) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(src) for f in names if f.endswith(SUFFIXES))


def decode(raw, decoder, path, offset):
    """Bytes -> text; an undecodable byte is an error naming the file and its byte offset."""
    try:
        return decoder.decode(raw, final=not raw)
    except UnicodeDecodeError as err:
        pending = len(err.object) - len(raw)               # bytes the decoder held back from the last read
        raise UserError(f"{path} is not UTF-8 at byte {offset - pending + err.start:,} ({err.reason}); pass "
                        f"--errors=replace to replace undecodable bytes, or --errors=ignore to drop them") from None


def parquet_texts(path):
    """The `text` column of a parquet file, a row group batch at a time (bounded memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's own errors: a damaged or cut file
        raise UserError(f"{path} is not a readable parquet file ({str(err).splitlines()[0]})") from None
    if "text" not in table.schema_arrow.names:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise UserError(f"{path} row {row}: the 'text' field is {type(text).__name__}, not a string")
            yield text


def documents(src, errors="strict"):
    """Yield (path, text of one document) for a file or a folder of .txt/.jsonl/.parquet files; a .txt
    file is one document, read in blocks (None here) by chunks()."""
    for path in corpus_files(src):
        if path.endswith(".parquet"):
            yield from ((path, text) for text in parquet_texts(path))
        elif path.endswith(".jsonl"):
            with open(path, "rb") as fh:
                offset = 0
                for n, raw in enumerate(fh, start=1):
                    line = decode(raw, codecs.getincrementaldecoder("utf-8")(errors), path, offset)
                    offset += len(raw)
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path} line {n}: not a JSON object with a 'text' field") from None
                    if not isinstance(text, str):
                        raise UserError(f"{path} line {n}: the 'text' field is {type(text).__name__}, not a string")
                    yield path, text
        else:
            yield path, None


def chunks(src, errors="strict"):
    """(text chunk, ends a document, bytes read so far) in corpus order, each chunk ~CHUNK characters."""
    done = 0
    for path, text in documents(src, errors):
        if text is not None:
            done += len(text.encode("utf-8")) + 1
            yield text, True, done
            continue
        carry, offset, decoder = "", 0, codecs.getincrementaldecoder("utf-8")(errors)
        with open(path, "rb") as fh:
            while True:
                raw = fh.read(CHUNK)
                block = decode(raw, decoder, path, offset)
                offset += len(raw)
                done += len(raw)
                if not raw:
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


def prepare_stream(src, name, tokenizer=None, workers=None, val_fraction=0.01, progress=None, errors="strict"):
    """Tokenise a corpus of any size into data/<name>/{train,val}.bin with bounded memory. A bad corpus
    (undecodable bytes, a broken line, a non-string text) stops it with one error line; the set already
    in data/<name>, if any, is left as it was."""
    from multiprocessing import get_context
    progress = progress or sys.stderr
    if not os.path.exists(src):
        raise UserError(f"{src} does not exist (a text file or a folder of .txt, .jsonl or .parquet files)")
    if not corpus_files(src):
        raise UserError(f"{src} holds no .txt, .jsonl or .parquet file")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    workers = workers or max(1, os.cpu_count() or 1)
    tok = load_tokenizer(tokenizer)             # checked here, before any file is written
    folder = os.path.join(DATA_DIR, name)
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    for stale in [f for f in os.listdir(folder) if ".tmp." in f]:
        os.remove(os.path.join(folder, stale))  # temp files of an interrupted preparation
    files = corpus_files(src)
    total = sum(os.path.getsize(f) for f in files if not f.endswith(".parquet"))  # parquet: compressed, not counted
    of_total = f" / {total / 1e6:,.0f}" if not any(f.endswith(".parquet") for f in files) else ""
    dtype = bin_dtype(tok.n_vocab)
    tmp = os.path.join(folder, f"all.bin.tmp.{os.getpid()}")
    n, top, t0, last = 0, 0, time.time(), 0.0
    try:
        with get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool, open(tmp, "wb") as out:

            def tokenise(batch, done):  # a bounded batch at a time: memory does not grow with the corpus
                nonlocal n, top, last
                for ids in pool.map(_encode, batch):
                    out.write(ids.astype(dtype).tobytes())
                    n += len(ids)
                    top = max(top, int(ids.max()) if len(ids) else 0)
                if progress and time.time() - last > 0.5:
                    last = time.time()
                    print(f"\r{done / 1e6:,.0f}{of_total} MB of text, {n / 1e6:,.1f}M tokens, "
                          f"{n / (last - t0) / 1e3:,.0f}k tokens/s", end="", file=progress, flush=True)

            batch, done = [], 0
            for text, ends, done in chunks(src, errors):
                batch.append((text, ends))
                if len(batch) == 2 * workers:
                    tokenise(batch, done)
                    batch = []
            if batch:
                tokenise(batch, done)
        n_val = max(1, int(n * val_fraction))
        if n - n_val < 2:
            raise UserError(f"{src} gives {n} tokens: too few for a train and a val split")
    except BaseException:
        if progress and last:
            print(file=progress)                # the progress line ends: the error is the last line, alone
        if os.path.exists(tmp):
            os.remove(tmp)
        if created and not os.listdir(folder):
            os.rmdir(folder)
        raise
    tokens = np.memmap(tmp, dtype=dtype, mode="r", shape=(n,))

    def write_val(path):
        tokens[n - n_val:].tofile(path)

    def write_train(path):
        os.truncate(tmp, (n - n_val) * np.dtype(dtype).itemsize)  # the train split is the head: no copy
        os.replace(tmp, path)

    spec = os.path.abspath(tokenizer) if tokenizer and tokenizer != "gpt2" else "gpt2"
    finish_bins(folder, {"val": write_val, "train": write_train},
                {"tokenizer": spec, "vocab_size": GPT2_VOCAB if spec == "gpt2" else -(-tok.n_vocab // 64) * 64,
                 "dtype": np.dtype(dtype).name, "max_id": top, "tokens": {"train": n - n_val, "val": n_val},
                 "source": os.path.abspath(src)})
    secs = time.time() - t0
    if progress:
        print(f"\r{done / 1e6:,.0f} MB of text -> {folder}: {n - n_val:,} train and {n_val:,} val tokens "
              f"({np.dtype(dtype).name}) in {secs:.1f} s, {n / secs / 1e3:,.0f}k tokens/s with {workers} processes",
              file=progress)
    return folder


def main(argv):
    parser = ArgParser(prog="python tools/prepare.py", description="prepare a corpus: SRC -> data/NAME")
    parser.add_argument("src", help="a text file, or a folder of .txt, .jsonl and .parquet files")
    parser.add_argument("name", help="the dataset name: data/NAME, then train.py --dataset=NAME")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: GPT-2's BPE)")
    parser.add_argument("--workers", type=int, default=None, help="tokenising processes (default: one per core)")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="the last fraction of tokens for val")
    parser.add_argument("--errors", choices=("strict", "replace", "ignore"), default="strict",
                        help="bytes that are not UTF-8: an error (strict), U+FFFD (replace), or dropped (ignore)")
    args = parser.parse_args(argv)
    if not args.name or os.sep in args.name or args.name in (".", "..", "synthetic"):
        raise UserError(f"NAME must be a plain folder name under data/, got '{args.name}'")
    prepare_stream(args.src, args.name, args.tokenizer, args.workers, args.val_fraction, errors=args.errors)


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
