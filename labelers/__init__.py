"""labelers: how to ask a local LLM for relevance labels and synthetic queries.

Backends (hf, vllm, openai) behind one interface, the answer-likelihood
reward and query generation. Works on in-memory records only: reading files
and running stages is `distill`'s job, and this package never imports it.
"""
