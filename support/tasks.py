"""
Synthetic tasks whose right answer is known, generated on the fly: `--dataset=<name>` for a name in
TASKS. Each has the interface of support/data.py's TextData (vocab_size, batch, whole_split) and
labels every input token, so that routing can be measured against what the token is.

- `synthetic` (SyntheticMixture): sequences made of segments, each drawn from one of a few token
  sources (random sparse Markov chains over partly overlapping token ranges); the label is the
  source. Which expert a token goes to can be compared with its source: NMI(top-1 expert, source).
- `facts` and `facts_binary` (Facts): a table of random facts to memorise, in the spirit of
  Allen-Zhu & Li, "Physics of Language Models: Part 3.3, Knowledge Capacity Scaling Laws" (ICLR
  2025). Person i has A attributes, each a value drawn uniformly from V, so the table holds exactly
  N * A * log2(V) bits. A record spells the person's name, then each attribute token followed by
  its value, the attributes in a random order:

      facts:         [first] [last] [a2] [v] [a0] [v] [a3] [v] [a1] [v]     128 x 128 names, N=8,192, A=4, V=64
      facts_binary:  [1] [0] [1] [1] [0] ... (12 binary digits) [a0] [v]    N=4,096, A=1, V=256

  Only the values are targets (the names are random, nothing to predict). Bits stored: the table's
  bits minus the cross-entropy on every fact once, N*A*(log2 V - CE / ln 2), as Allen-Zhu & Li
  measure it for uniformly random values. Labels: 1 at the positions that answer (attribute tokens),
  0 elsewhere. In `facts_binary` every record is written with three token ids (the two digits and
  one attribute), so hash routing, which fixes the experts of a token id, can use only the experts
  of those three ids whatever E is; a learned router can spread the people over all experts.
"""

import math

import torch

from support.rundir import UserError


class SyntheticMixture:
    """
    n_sources Markov chains over token ids [0, vocab). Source s lives on the range
    [s*w/2, s*w/2 + w) with w = 2*vocab/(n_sources+1): neighbouring sources share half their
    tokens, so the token id alone does not give the source away. A sequence is cut into segments of
    seg_len tokens; each segment picks its source uniformly, starts at a uniform token of its range,
    and then moves from token i to one of `branching` successors in the range (random weights,
    the row trans[s, i]).
    """
    tokenizer = None       # token ids, not text
    eval_sequences = 1024  # the fixed sample that stands for the whole val split

    def __init__(self, vocab=256, n_sources=4, seg_len=32, branching=4, seed=0):
        if vocab < 16:
            raise UserError(f"dataset=synthetic needs vocab_size >= 16, got {vocab}")
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.n_sources, self.seg_len, self.n_labels = vocab, n_sources, seg_len, n_sources
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

    def sample(self, batch_size, block_size, generator, device):
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

    def check(self, block_size, vocab_size):
        pass  # any block size; the mixture fits the model's vocabulary (see TASKS)

    def batch(self, split, batch_size, block_size, generator, device, rank=0, world=1):
        return tuple(t[rank * batch_size:(rank + 1) * batch_size]
                     for t in self.sample(batch_size * world, block_size, generator, device))

    def whole_split(self, split, batch_size, block_size, device):
        """There is no finite split: a fixed sample of eval_sequences sequences stands for it."""
        gen = torch.Generator().manual_seed(3 if split == "val" else 4)
        for _ in range(0, self.eval_sequences, batch_size):
            yield self.sample(batch_size, block_size, gen, device)


class Facts:
    """N people, each with A attributes of V values; see the docstring at the top."""
    tokenizer = None
    n_labels = 2

    def __init__(self, n_people, n_attrs, n_values, names=(128, 128), digits=0, seed=1234):
        g = torch.Generator().manual_seed(seed)  # the table itself: the same for every training seed
        self.N, self.A, self.V = n_people, n_attrs, n_values
        if digits:                                # a binary ID of `digits` digits: tokens 0 and 1
            ids = torch.randperm(2 ** digits, generator=g)[:n_people]
            self.names = torch.stack([(ids >> j) & 1 for j in reversed(range(digits))], 1)  # (N, digits)
            first_attr = 2
        else:                                     # a first name and a last name
            F, L = names
            pairs = torch.randperm(F * L, generator=g)[:n_people]
            self.names = torch.stack([pairs // L, F + pairs % L], 1)                        # (N, 2)
            first_attr = F + L
        self.attr0, self.value0 = first_attr, first_attr + n_attrs     # token ids: names | attributes | values
        self.values = torch.randint(n_values, (n_people, n_attrs), generator=g)               # (N, A)
        self.vocab_size = self.value0 + n_attrs * n_values
        self.length = self.names.shape[1] + 2 * n_attrs                # tokens of a record
        self.bits = n_people * n_attrs * math.log2(n_values)

    def records(self, people, generator):
        """x, y (n, length-1) and labels (1 where a value is the target) for the given people."""
        n, K = len(people), self.names.shape[1]
        order = torch.argsort(torch.rand(n, self.A, generator=generator), dim=1)           # (n, A)
        seq = torch.empty(n, self.length, dtype=torch.long)
        seq[:, :K] = self.names[people]
        seq[:, K::2] = self.attr0 + order
        seq[:, K + 1::2] = self.value0 + order * self.V + self.values[people].gather(1, order)
        x, y = seq[:, :-1], torch.full((n, self.length - 1), -100, dtype=torch.long)       # -100: no target
        y[:, K::2] = seq[:, K + 1::2]
        return x, y, (y != -100).long()

    def check(self, block_size, vocab_size):
        if block_size < self.length - 1:
            raise UserError(f"a record of this task is {self.length} tokens: block_size must be >= {self.length - 1}, "
                            f"got {block_size}")
        if vocab_size < self.vocab_size:
            raise UserError(f"this task needs vocab_size >= {self.vocab_size}, got {vocab_size}")

    def batch(self, split, batch_size, block_size, generator, device, rank=0, world=1):
        """A global batch of batch_size * world records (the same on every process), this rank's slice."""
        people = torch.randint(self.N, (batch_size * world,), generator=generator)
        return tuple(t[rank * batch_size:(rank + 1) * batch_size].to(device) for t in self.records(people, generator))

    def whole_split(self, split, batch_size, block_size, device):
        """Every fact once: all N people, each attribute once (a fixed order per person)."""
        gen = torch.Generator().manual_seed(5)
        everyone = torch.arange(self.N)
        for i in range(0, self.N, batch_size):
            yield tuple(t.to(device) for t in self.records(everyone[i:i + batch_size], gen))

    def bits_stored(self, ce):
        """Bits of the table the model holds, from its mean cross-entropy (nats) on every fact once."""
        return max(0.0, self.N * self.A * (math.log2(self.V) - ce / math.log(2)))


TASKS = {  # name -> the task, given the model's vocabulary (the mixture shrinks to fit a smaller one)
    "synthetic": lambda vocab=256: SyntheticMixture(vocab=min(256, vocab)),
    "facts": lambda vocab=None: Facts(n_people=8192, n_attrs=4, n_values=64),
    "facts_binary": lambda vocab=None: Facts(n_people=4096, n_attrs=1, n_values=256, digits=12),
}
