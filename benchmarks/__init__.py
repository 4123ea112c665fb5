"""Speed and quality measurements beside the package (run from the repository root):
`python -m benchmarks.bench`, `python -m benchmarks.bench_cpu_bound`, `python -m benchmarks.eval_lambada`."""
