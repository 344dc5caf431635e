"""MLLM family: LLaVA-1.5 instruction fine-tuning for post classification (paper
``llava-sentiment-token-filtering``): the instruction format (:mod:`.prompt`), loading and
freezing (:mod:`.model`), the language model's input built from per-image visual features
(:mod:`.inputs`), training (:mod:`.train`), label scoring (:mod:`.scoring`) and the run's
predictor (:mod:`.predictor`).
"""
