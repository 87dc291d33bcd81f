"""The offline analysis: which tower predicts each vocabulary item, and how sure we are.

runner.py runs it on a workdir; estimators/ holds one module per estimator;
summary.py and stats.py the statistics; wordclass.py the word classes (CoNLL-U);
structural_probe.py the Hewitt & Manning probe; compare.py the cross-run comparison.
"""
