"""Evaluation on this library's exact numerics: perplexity and KL divergence as llama.cpp's ``llama-perplexity``
computes them (``llama.eval.perplexity``, ``llama.eval.kld``), and a model for EleutherAI's lm-evaluation-harness
(``llama.eval.harness``, registered as ``llama``; needs the ``eval`` extra). ``python -m llama.eval --help``.

Nothing is imported here: ``import llama.eval.harness`` loads lm-eval, the other modules do not.
"""
