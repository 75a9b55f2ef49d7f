"""Studies: one-off questions answered with the harness's pieces, each run as ``python -m bench.studies.<name>``.

* :mod:`bench.studies.predictors`: learned block-mask predictors on a small model's attention, recall
  against block sparsity and the cost of a prediction (a random-weight model).
* :mod:`bench.studies.learned_masks`: the same predictors judged on a trained model
  (:mod:`bench.studies.byte_lm`, a byte-level decoder trained here on the standard library's sources):
  recall against the oracle and fixed patterns at equal sparsity, and the model's loss with each mask.
* :mod:`bench.studies.funnel_model`: a whole Hugging Face Funnel model, eager against the fused layers.
"""
