"""Cultural benchmarks: data importers, suites, metrics, run directory, reports, CLI (`cultengine bench`)."""
