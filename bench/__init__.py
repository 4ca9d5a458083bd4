"""Benchmarks of fanin. ``fanin bench`` (bench/cli.py) is the load generator and the sweep; it
talks to servers over HTTP only and imports nothing of the server side. The GPU scripts
(gpu_suite.sh, gpu_sweeps.sh, engine_bench.py, ...) and their results (results/) live here
too."""
