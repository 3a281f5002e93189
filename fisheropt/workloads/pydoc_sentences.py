"""Sentences of CPython's ``help()`` text: the corpus of the ESimCSE workload, offline.

:func:`load_sentences` extracts unique English prose sentences from
``pydoc_data.topics`` (which ships with CPython, so nothing is downloaded);
:func:`build_dataset` splits them, builds the vocabulary and maps words to the
ids that :mod:`fisheropt.workloads.esimcse_encoder` reads (0 = padding).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from .word_lm import tokenize

__all__ = ["UNK_ID", "build_dataset", "load_sentences"]

UNK_ID = 1  # id of words outside the vocabulary (0 is the encoder's padding, PAD)


def load_sentences(*, min_tokens=5, max_tokens=32):
    """Unique English sentences of ``pydoc_data.topics`` as (word tuple, topic key), in a fixed order.

    Prose paragraphs only: a paragraph with a ``>>>``/``...`` prompt or under 85 %
    letters and spaces (code, tables, grammar) is skipped; sentences end in
    ``.?!:``; words are lower-cased ``[a-z]+`` (:func:`fisheropt.workloads.word_lm.tokenize`);
    sentences of ``min_tokens`` to ``max_tokens`` words are kept."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if ">>>" in para or "..." in para:
                continue
            text = " ".join(line.strip() for line in para.split("\n"))
            if not text or sum(ch.isalpha() or ch == " " for ch in text) / len(text) < 0.85:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(*])", text):
                if not sentence.rstrip().endswith((".", "?", "!", ":")):
                    continue
                words = tuple(tokenize(sentence))
                if min_tokens <= len(words) <= max_tokens and words not in seen:
                    seen.add(words)
                    out.append((words, key))
    return out


def build_dataset(eval_fraction=0.15, split_seed=0, *, min_tokens=5, max_tokens=32):
    """(train ids, eval ids, train topics, eval topics, vocab, train counts).

    The split does not depend on the run seed; a topic is the index of the
    ``help()`` topic a sentence comes from.

    Ids: 0 = padding, 1 = ``<unk>``, then every word seen at least twice in the
    training sentences, most frequent first (ties alphabetical)."""
    loaded = load_sentences(min_tokens=min_tokens, max_tokens=max_tokens)
    sentences = [words for words, _ in loaded]
    topic_names = sorted({topic for _, topic in loaded})
    topic_of = np.array([topic_names.index(topic) for _, topic in loaded])
    order = np.random.default_rng(split_seed).permutation(len(sentences))
    n_eval = round(eval_fraction * len(sentences))
    eval_sentences = [sentences[i] for i in order[:n_eval]]
    train_sentences = [sentences[i] for i in order[n_eval:]]
    freq = Counter(w for words in train_sentences for w in words)
    ranked = sorted((kv for kv in freq.items() if kv[1] >= 2), key=lambda kv: (-kv[1], kv[0]))
    vocab = ["<pad>", "<unk>"] + [w for w, _ in ranked]  # ids PAD and UNK_ID
    index = {w: i for i, w in enumerate(vocab)}

    def ids(words):
        return np.array([index.get(w, UNK_ID) for w in words], dtype=np.int64)

    train, evals = [ids(s) for s in train_sentences], [ids(s) for s in eval_sentences]
    counts = np.bincount(np.concatenate(train), minlength=len(vocab))
    return train, evals, topic_of[order[n_eval:]], topic_of[order[:n_eval]], vocab, counts
