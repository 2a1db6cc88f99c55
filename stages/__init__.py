"""One module per DVC stage. Each reads its section of params.yaml, its declared deps, and writes its
declared outs and metrics. Run plainly with `python -m stages.<name>`, or monitored by Prefect with
`python -m flows.stage <name>` (what dvc.yaml calls)."""
