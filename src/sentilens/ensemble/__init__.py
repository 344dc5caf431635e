"""Ensembles: several trained runs that predict as one, by the weighted mean of their label probabilities.

A run of this family is a folder whose ``config.json`` says ``family: ensemble`` and whose
``members/`` holds copies of the runs it combines (any family, each loaded through
:func:`sentilens.predict.load_predictor`), so the folder predicts, evaluates and serves on its own.
``build.py`` makes one (``sentilens ensemble``), ``predictor.py`` predicts with it.
"""
