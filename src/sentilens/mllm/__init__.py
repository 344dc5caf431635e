"""MLLM family: vision-language instruction fine-tuning for post classification (paper
``llava-sentiment-token-filtering``) over several model families (:mod:`.families`: LLaVA-1.5,
LLaVA-NeXT, Qwen2.5-VL / Qwen3-VL, SmolVLM): the instruction format (:mod:`.prompt`), loading and
freezing (:mod:`.model`), the language model's input built from per-image visual features
(:mod:`.inputs`), visual token pruning as a registry of strategies (:mod:`.pruning`), training
(:mod:`.train`), label scoring (:mod:`.scoring`) and the run's predictor (:mod:`.predictor`).
"""
