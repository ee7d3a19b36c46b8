"""AirRep (Sun et al. 2025, arXiv 2505.18513): a learned representation for group attribution."""
