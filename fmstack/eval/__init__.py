"""Evaluation: log-likelihood scoring (`scoring`), HellaSwag, sliding-window perplexity, and the
lm-evaluation-harness model `fmstack` (`lm_eval_adapter`, needs the `eval` extra)."""
