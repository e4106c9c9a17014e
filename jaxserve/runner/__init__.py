"""The device side: a StepPlan turned into padded arrays (batch.py), run by a step compiled per
shape bucket (runner.py), with penalty rows (penalties.py) and KV calibration (kv_calibration.py)."""
