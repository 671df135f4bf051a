"""
Sample text from a checkpoint written by train.py (best.pt, the lowest val loss, unless --last),
or imported by tools/convert.py.

    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --temperature=0            # greedy: always the most likely next token
"""

import os
import sys

import torch

from families import from_checkpoint
from support.data import load_tokenizer
from support.rundir import ArgParser, UserError, cli, load_checkpoint


def parse(argv):
    parser = ArgParser(prog="python sample.py", description="sample from a train.py checkpoint")
    parser.add_argument("--out_dir", default="out", help="the run's directory (holds ckpt.pt)")
    parser.add_argument("--start", default="\n", help="prompt text (at least one token)")
    parser.add_argument("--num_samples", type=int, default=3, help="samples to print (>= 1)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens per sample (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.8, help="> 0 samples; 0 = greedy")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--last", action="store_true", help="the last checkpoint (ckpt.pt), not the best (best.pt)")
    args = parser.parse_args(argv)
    checks = [(args.num_samples >= 1, f"--num_samples must be >= 1, got {args.num_samples}"),
              (args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}"),
              (args.temperature >= 0 and args.temperature < float("inf"),
               f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}"),
              (args.top_k >= 0, f"--top_k must be >= 0 (0 = no cut), got {args.top_k}"),
              (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
              (args.start != "", "--start is empty: give a prompt of at least one character, e.g. --start='\\n'"),
              (args.device in ("cpu", "cuda") or args.device.startswith("cuda:"),
               f"--device must be cpu or cuda, got '{args.device}'"),
              (not args.device.startswith("cuda") or torch.cuda.is_available(),
               f"--device={args.device} but no CUDA device is available (use --device=cpu)")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args


def main(argv):
    args = parse(argv)
    name = "best.pt" if not args.last and os.path.exists(os.path.join(args.out_dir, "best.pt")) else "ckpt.pt"
    ckpt = load_checkpoint(args.out_dir, hint=f"train one with python train.py --out_dir={args.out_dir}", name=name)
    try:
        model = from_checkpoint(ckpt["model_args"])[1]
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"checkpoint in {args.out_dir} does not describe a model of this version "
                        f"({str(err).splitlines()[0]})") from None
    model.eval().to(args.device)
    if "tokenizer" in ckpt and ckpt["tokenizer"] is None:
        raise UserError(f"the model in {args.out_dir} was trained on a synthetic task ({ckpt['config']['dataset']}): "
                        f"its tokens are not text")
    enc = load_tokenizer(ckpt.get("tokenizer") or args.out_dir)  # the run's tokenizer, or an imported model's
    ids = enc.encode_ordinary(args.start)
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise UserError(f"the prompt has token id {max(ids)}, outside this model's vocabulary of {vocab} "
                        f"(a model of the synthetic task does not read text)")
    torch.manual_seed(args.seed)
    start = torch.tensor([ids], device=args.device)
    for _ in range(args.num_samples):
        out = model.generate(start, args.max_new_tokens, args.temperature, args.top_k or None,
                             n_vocab=min(enc.n_vocab, vocab))
        print(enc.decode(out[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
