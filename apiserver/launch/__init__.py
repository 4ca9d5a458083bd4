"""The launcher process of `fanin serve`: the command line, the default model, the listening
socket, the run directory, and the supervision of the engine core and the API servers (spawn,
readiness pipes, respawn, drain, systemd notifications). It reaches the API-server side only
through ``apiserver.config`` and the shared ``cpu_budget`` and ``load_table``, and imports
neither torch nor transformers unless it has to build the default model.
"""
