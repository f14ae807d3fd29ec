"""Evaluation: the FID InceptionV3 in Flax (`inception`), its weight converter (`convert_inception`), and the
ADM evaluator's metrics — FID, sFID, Inception Score, precision/recall, reference batches (`metrics`)."""
