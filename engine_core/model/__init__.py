"""The engine's model side: weights, KV cache, attention and the runner the scheduler drives.

Entry point: ``engine_core.model.runner_factory.load_runner``.
"""
