"""Per-example LoRA-gradient features with random projection, and the feature store.

Modules: ``per_example_grads`` (hooks: per-example gradients from one batched backward),
``projection`` (device-independent seeded Rademacher projections: factorised and dense),
``adam`` (Adam update directions from a checkpoint's optimizer state), ``featurizer``
(``LoraFeaturizer``: projected features of a batch, the model it reads, sampled labels),
``batching`` (token-budget batches and resumable shards), ``store`` (``FeatureStore``,
``StoreMismatchError``, sampled-label row ids) and ``extract`` (``ExtractConfig``, ``run_extract``:
the ``iaif extract`` stage around the featurizer)."""
