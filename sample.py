"""
Sample text from a checkpoint written by train.py.

    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
"""

import argparse
import os
import sys

import torch

from data import gpt2_encoding
from model import GPT, GPTConfig
from train import load_checkpoint


def main():
    parser = argparse.ArgumentParser(description="sample from a train.py checkpoint")
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--start", default="\n", help="prompt text")
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    try:
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval().to(args.device)
    torch.manual_seed(args.seed)
    enc = gpt2_encoding()
    start = torch.tensor([enc.encode_ordinary(args.start)], device=args.device)
    for _ in range(args.num_samples):
        out = model.generate(start, args.max_new_tokens, args.temperature, args.top_k, n_vocab=enc.n_vocab)
        print(enc.decode(out[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    main()
