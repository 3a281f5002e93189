"""The specification as package data: spec pages (*.md), golden vectors (vectors/*.json) and the
C conformance runner, installed as ``fisheropt.spec`` so that ``importlib.resources`` finds them
in a checkout installed with ``pip install -e .`` and in a regular install alike."""
