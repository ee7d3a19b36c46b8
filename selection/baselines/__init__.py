"""Baselines on the same pool and stores: random, LESS, representation similarity (RDS+) and a
sentence-embedding variant. First-order top-k is the λ = 0 path of the interaction-aware selector
(``iaif.selection.select``)."""
