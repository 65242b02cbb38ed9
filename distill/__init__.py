"""distill: turn a local LLM into a teacher for compact retrieval models.

Stages (each a `distill` sub-command): generate -> mine -> label -> train -> eval.
The LLM-facing parts live in the sibling package `labelers`.
"""
__version__ = "0.1.0"
