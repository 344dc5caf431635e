"""sentilens: what a social-media post made of an image and a text says.

Two model families share one data layer, one metrics module, one run-directory format and
one predictor interface: the MLLM family (LLaVA-1.5 fine-tuning with CLS-attention visual
token filtering) and the fusion family (CNN + prompted LM, contextual attention with dynamic
routing).
"""

__version__ = "0.1.0"
