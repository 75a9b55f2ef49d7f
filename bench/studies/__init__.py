"""Studies: one-off questions answered with the harness's pieces, each run as ``python -m bench.studies.<name>``.

* :mod:`bench.studies.predictors`: learned block-mask predictors on a small model's attention, recall
  against block sparsity and the cost of a prediction.
"""
