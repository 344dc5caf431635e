"""Fusion family (paper ``cnn-llm-contextual-attention-fusion``): a CNN image branch and a prompted
language-model text branch, fused by contextual attention with dynamic routing, then FC + RNN.

Modules: ``config`` (the run's recipe), ``encoders`` (the two branches), ``cache`` (features on disk),
``layers`` (attention, routing, head: the equations), ``model`` (the variants), ``train``,
``predictor``, ``ablation``.
"""
