"""The engine-core process: IO thread, busy loop, scheduler, sampler (model side in ``model/``)."""
