"""The tooling around the product: the local pair driver, the demo, the benchmarks and the invoke
task bodies."""
