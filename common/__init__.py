"""Plumbing every layer shares: run provenance, atomic file writes, the process rank."""
