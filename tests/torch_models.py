"""Small torch models shared by the fisheropt.torch tests (import it after ``pytest.importorskip("torch")``)."""

import torch
from torch import nn


class TokenModel(nn.Module):
    """Logits for every token of a sequence: an embedding, a running sum along the sequence, tanh,
    a linear read-out (so each token's logits depend on the tokens before it)."""

    def __init__(self, vocab, width, classes):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, classes)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids).cumsum(1)))
