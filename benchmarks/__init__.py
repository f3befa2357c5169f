"""The benchmarks: ``python -m benchmarks`` lists them, ``python -m benchmarks NAME [ARGS...]`` runs one
(benchmarks/README.md). Each script also runs on its own: ``python benchmarks/bench_NAME.py [ARGS...]``."""
