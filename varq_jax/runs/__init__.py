"""Runs: orchestration above the method — resumable PTQ workdirs with fingerprinted stages, the quantize command."""
