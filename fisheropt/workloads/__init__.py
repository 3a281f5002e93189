"""Workloads: the models and data that the demo, the experiments, the benchmarks and the tests train.

None of this is part of the reference. :mod:`fisheropt.refimpl` holds only what
``spec/`` specifies (the update rules, the Fisher estimators and directions,
ESimCSE's specified pieces, the isotropy measures); a workload produces the
gradients, per-sample gradients and logits Jacobians that those consume, and no
rule depends on it (spec/fisher.md and spec/esimcse.md describe these test beds).

* :mod:`~fisheropt.workloads.models`: :class:`~fisheropt.workloads.models.SoftmaxRegression`
  and :class:`~fisheropt.workloads.models.MLP` with analytic derivatives, and
  :func:`~fisheropt.workloads.models.load_digits_split` (scikit-learn's bundled digits);
* :mod:`~fisheropt.workloads.word_lm`: a fixed-window word LM with a tied embedding
  (the Coupled Adam experiment) and :func:`~fisheropt.workloads.word_lm.load_pydoc_corpus`
  (CPython's ``help()`` text, offline);
* :mod:`~fisheropt.workloads.esimcse_encoder`: a bag-of-embeddings sentence encoder
  and :mod:`~fisheropt.workloads.pydoc_sentences`, its corpus (prose sentences of
  the same ``help()`` text): the ESimCSE experiment.

Everything is NumPy with hand-written backward passes (no autodiff), seeded, in
float32 or float64.
"""
