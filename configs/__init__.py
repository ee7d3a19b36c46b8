"""Configs shipped with the package: the demo default (``demo.yaml``) and the Llama-3.1-8B recipes."""
